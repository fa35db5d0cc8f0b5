"""What a Tryton administrator sets up before the sync can write sales (run in Tryton's venv).

    python setup_template.py --config trytond.conf --database DB --mappings mappings.toml

Runs in-process through proteus (``proteus.config.set_trytond``) as the ``admin`` user and
uses the set-up helpers that ship inside the module wheels (the same ones Tryton's own test
scenarios use), so that company, chart and fiscal year are made exactly as Tryton makes them.
It creates:

- the currency CNY, the country CN and its 31 mainland province-level subdivisions (created
  directly, with Chinese names as ``service.erp.transform.parse_cn_address`` writes them;
  importing all countries with pycountry costs ~47 s and romanises the names);
- a company on CNY, the English minimal chart of accounts, a fiscal year around today with
  monthly periods and invoice sequences;
- a product category with revenue/expense accounts and one goods product per SKU of
  ``[products]`` in mappings.toml (``product.product.code`` = SKU);
- the web shop "CRM" (warehouse WH, country CN) the sync files its sales under;
- the user ``crm_sync`` (password read from the file named by TRYTON_SYNC_PASSFILE) in the
  sales, party and stock groups, with the company.

Sales are invoiced on fulfillment: invoicing belongs to the ERP, and confirming a sale then only
creates its customer shipment. Idempotent per step: each looks its record up first.
"""

from __future__ import annotations

import argparse
import os
import re
import tomllib
from decimal import Decimal
from pathlib import Path

# ISO 3166-2:CN code -> (name as the CRM transform writes it, Tryton subdivision type).
CN_SUBDIVISIONS = {
    "CN-BJ": ("北京市", "municipality"), "CN-TJ": ("天津市", "municipality"),
    "CN-SH": ("上海市", "municipality"), "CN-CQ": ("重庆市", "municipality"),
    "CN-HE": ("河北省", "province"), "CN-SX": ("山西省", "province"),
    "CN-LN": ("辽宁省", "province"), "CN-JL": ("吉林省", "province"),
    "CN-HL": ("黑龙江省", "province"), "CN-JS": ("江苏省", "province"),
    "CN-ZJ": ("浙江省", "province"), "CN-AH": ("安徽省", "province"),
    "CN-FJ": ("福建省", "province"), "CN-JX": ("江西省", "province"),
    "CN-SD": ("山东省", "province"), "CN-HA": ("河南省", "province"),
    "CN-HB": ("湖北省", "province"), "CN-HN": ("湖南省", "province"),
    "CN-GD": ("广东省", "province"), "CN-HI": ("海南省", "province"),
    "CN-SC": ("四川省", "province"), "CN-GZ": ("贵州省", "province"),
    "CN-YN": ("云南省", "province"), "CN-SN": ("陕西省", "province"),
    "CN-GS": ("甘肃省", "province"), "CN-QH": ("青海省", "province"),
    "CN-NM": ("内蒙古自治区", "autonomous region"),
    "CN-GX": ("广西壮族自治区", "autonomous region"),
    "CN-XZ": ("西藏自治区", "autonomous region"),
    "CN-NX": ("宁夏回族自治区", "autonomous region"),
    "CN-XJ": ("新疆维吾尔自治区", "autonomous region"),
}

SHOP_NAME = "CRM"
SYNC_LOGIN = "crm_sync"
SYNC_GROUPS = [("sale", "group_sale"), ("sale", "group_sale_admin"),
               ("party", "group_party_admin"), ("stock", "group_stock"),
               ("product", "group_product_admin")]


def products_from(mappings: Path) -> dict[str, str]:
    """SKU -> product name: the trailing comment of each [products] line, else the SKU."""
    skus = tomllib.loads(mappings.read_text("utf-8"))["products"]
    names: dict[str, str] = {}
    for line in mappings.read_text("utf-8").splitlines():
        m = re.match(r'\s*"?[^=]+?"?\s*=\s*"([^"]+)"\s*#\s*(.+)$', line)
        if m and m.group(1) in skus.values():
            names[m.group(1)] = m.group(2).strip()
    return {sku: names.get(sku, sku) for sku in skus.values()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--database", required=True)
    ap.add_argument("--mappings", required=True, type=Path)
    args = ap.parse_args()
    sync_password = Path(os.environ["TRYTON_SYNC_PASSFILE"]).read_text().strip()

    from proteus import Model
    from proteus import config as pconfig

    cfg = pconfig.set_trytond(args.database, config_file=args.config)

    from trytond.modules.account.tests.tools import (
        create_chart,
        create_fiscalyear,
        get_accounts,
    )
    from trytond.modules.account_invoice.tests.tools import set_fiscalyear_invoice_sequences
    from trytond.modules.company.tests.tools import create_company

    Currency = Model.get("currency.currency")
    Country = Model.get("country.country")
    Subdivision = Model.get("country.subdivision")
    Party = Model.get("party.party")
    Company = Model.get("company.company")
    FiscalYear = Model.get("account.fiscalyear")
    Category = Model.get("product.category")
    Uom = Model.get("product.uom")
    Template = Model.get("product.template")
    Product = Model.get("product.product")
    Location = Model.get("stock.location")
    Shop = Model.get("web.shop")
    User = Model.get("res.user")
    Group = Model.get("res.group")
    ModelData = Model.get("ir.model.data")
    SaleConfig = Model.get("sale.configuration")

    cny = next(iter(Currency.find([("code", "=", "CNY")])), None)
    if cny is None:
        cny = Currency(name="Chinese Yuan Renminbi", code="CNY", numeric_code="156",
                       symbol="¥", rounding=Decimal("0.01"), digits=2)
        cny.save()

    cn = next(iter(Country.find([("code", "=", "CN")])), None)
    if cn is None:
        cn = Country(name="China", code="CN", code3="CHN", code_numeric="156")
        cn.save()
    have = {s.code for s in Subdivision.find([("country", "=", cn.id)])}
    for code, (name, kind) in CN_SUBDIVISIONS.items():
        if code not in have:
            Subdivision(country=cn, code=code, name=name, type=kind).save()

    if not Company.find([]):
        owner = Party(name="CRM-ERP-Sync 演示公司")
        owner.save()
        create_company(party=owner, currency=cny)
    company, = Company.find([])

    accounts = get_accounts(company)
    if "revenue" not in accounts:
        create_chart(company)
        accounts = get_accounts(company)

    if not FiscalYear.find([]):
        fiscalyear = set_fiscalyear_invoice_sequences(create_fiscalyear(company))
        fiscalyear.click("create_period")

    category = next(iter(Category.find([("name", "=", "Electronics")])), None)
    if category is None:
        category = Category(name="Electronics", accounting=True,
                            account_revenue=accounts["revenue"],
                            account_expense=accounts["expense"])
        category.save()

    unit, = Uom.find([("id", "=", ModelData.get_id("product", "uom_unit", cfg.context))])
    have = {p.code for p in Product.find([])}
    for sku, name in products_from(args.mappings).items():
        if sku in have:
            continue
        template = Template(name=name, type="goods", salable=True, default_uom=unit,
                            sale_uom=unit, list_price=Decimal("100"),
                            account_category=category)
        # product.product.code is computed: the template's code (none here) + suffix_code.
        template.products[0].suffix_code = sku
        template.save()

    sale_config = SaleConfig(1)
    sale_config.sale_invoice_method = "fulfillment"
    sale_config.sale_shipment_method = "order"
    sale_config.save()

    if not Shop.find([("name", "=", SHOP_NAME)]):
        warehouse, = Location.find([("type", "=", "warehouse")], limit=1)
        shop = Shop(name=SHOP_NAME, company=company, currency=cny)
        shop.warehouses.append(Location(warehouse.id))
        shop.countries.append(Country(cn.id))
        shop.save()

    user = next(iter(User.find([("login", "=", SYNC_LOGIN)])), None)
    if user is None:
        user = User(name="CRM sync", login=SYNC_LOGIN)
    user.password = sync_password
    for module, xml_id in SYNC_GROUPS:
        group = Group(ModelData.get_id(module, xml_id, cfg.context))
        if group not in user.groups:
            user.groups.append(group)
    if company not in user.companies:
        user.companies.append(Company(company.id))
    user.company = Company(company.id)
    user.save()
    print("tryton set-up complete:", args.database)


if __name__ == "__main__":
    main()
