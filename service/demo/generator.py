"""Demo CRM data: customers, sales orders with lines, market-demand records and a plan of
follow-up changes, shaped like what a Chinese CRM really holds (see ../shared/seed).

Pure and deterministic: everything comes from `random.Random` streams seeded from one
integer, so a seed always gives the same rows (tests, benchmarks and bug reports can be
replayed). No database access here; `service.demo.load` writes what this module makes.

Values are typed the way CRM users type them, on purpose: phone numbers in several
formats ('138 1234 5678', '+86 138-1234-5678', '0086 13812345678'), e-mails with capitals
or stray spaces, quantities with their unit ('10台'). They stay inside what the ERP
mapping understands: every phone is a Chinese mobile (11 digits) or an E.164 number with an
explicit '+country code', every unit and product code is listed in mappings.toml.
"""

from __future__ import annotations

import random
from bisect import bisect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from functools import lru_cache
from itertools import accumulate
from typing import Final, Generic, NamedTuple, TypeVar

T = TypeVar("T")

CENT: Final = Decimal("0.01")
WESTERN_SHARE: Final = 0.10
LONG_NOTES_SHARE: Final = 0.01  # customers whose notes exceed 4 KB (TOASTed)
LONG_NOTES_MIN_BYTES: Final = 6000

FIRST_ORDER_DATE: Final = date(2023, 1, 1)
LAST_ORDER_DATE: Final = date(2025, 6, 30)
BIRTH_FROM: Final = date(1950, 1, 1)
BIRTH_TO: Final = date(2006, 12, 31)

PENDING, PAID, SHIPPED, COMPLETED, CANCELLED = "待付款", "已付款", "已发货", "已完成", "已取消"
ORDER_STATUSES: Final = (PENDING, PAID, SHIPPED, COMPLETED, CANCELLED)
CURRENCY: Final = "元"
DEMAND_KINDS: Final = ("市场趋势", "客户需求反馈", "竞争对手分析")


class Weighted(Generic[T]):
    """Weighted choice with a precomputed cumulative table (one bisect per pick)."""

    __slots__ = ("_cum", "_items", "_total")

    def __init__(self, pairs: Sequence[tuple[T, int | float]]) -> None:
        self._items = [item for item, _ in pairs]
        self._cum = list(accumulate(float(w) for _, w in pairs))
        self._total = self._cum[-1]

    def pick(self, rng: random.Random) -> T:
        return self._items[bisect(self._cum, rng.random() * self._total)]


# --- people -----------------------------------------------------------------------------

# (family name, pinyin, weight ~ frequency per thousand); a few compound family names.
_FAMILY: Final = Weighted([
    (("王", "wang"), 74), (("李", "li"), 73), (("张", "zhang"), 70), (("刘", "liu"), 54),
    (("陈", "chen"), 45), (("杨", "yang"), 32), (("黄", "huang"), 24), (("赵", "zhao"), 23),
    (("吴", "wu"), 21), (("周", "zhou"), 21), (("徐", "xu"), 17), (("孙", "sun"), 16),
    (("马", "ma"), 15), (("朱", "zhu"), 14), (("胡", "hu"), 14), (("郭", "guo"), 13),
    (("何", "he"), 12), (("高", "gao"), 12), (("林", "lin"), 11), (("罗", "luo"), 10),
    (("郑", "zheng"), 10), (("梁", "liang"), 9), (("谢", "xie"), 8), (("宋", "song"), 7),
    (("唐", "tang"), 7), (("许", "xu"), 7), (("韩", "han"), 7), (("冯", "feng"), 7),
    (("邓", "deng"), 7), (("曹", "cao"), 6), (("彭", "peng"), 6), (("曾", "zeng"), 6),
    (("肖", "xiao"), 6), (("田", "tian"), 5), (("董", "dong"), 5), (("袁", "yuan"), 5),
    (("潘", "pan"), 5), (("于", "yu"), 5), (("蒋", "jiang"), 5), (("蔡", "cai"), 5),
    (("余", "yu"), 5), (("杜", "du"), 5), (("叶", "ye"), 5), (("程", "cheng"), 5),
    (("苏", "su"), 4), (("魏", "wei"), 4), (("吕", "lv"), 4), (("丁", "ding"), 4),
    (("任", "ren"), 4), (("沈", "shen"), 4), (("欧阳", "ouyang"), 1), (("司马", "sima"), 0.5),
    (("诸葛", "zhuge"), 0.3), (("上官", "shangguan"), 0.3),
])
_GIVEN_MALE: Final = (
    ("伟", "wei"), ("强", "qiang"), ("磊", "lei"), ("军", "jun"), ("勇", "yong"),
    ("杰", "jie"), ("涛", "tao"), ("明", "ming"), ("超", "chao"), ("刚", "gang"),
    ("平", "ping"), ("辉", "hui"), ("鹏", "peng"), ("浩", "hao"), ("俊", "jun"),
    ("峰", "feng"), ("建", "jian"), ("国", "guo"), ("志", "zhi"), ("宇", "yu"),
    ("博", "bo"), ("晨", "chen"), ("轩", "xuan"), ("昊", "hao"), ("天", "tian"),
)
_GIVEN_FEMALE: Final = (
    ("芳", "fang"), ("娜", "na"), ("敏", "min"), ("静", "jing"), ("丽", "li"),
    ("艳", "yan"), ("娟", "juan"), ("霞", "xia"), ("秀", "xiu"), ("英", "ying"),
    ("玲", "ling"), ("婷", "ting"), ("雪", "xue"), ("慧", "hui"), ("琳", "lin"),
    ("欣", "xin"), ("怡", "yi"), ("佳", "jia"), ("梦", "meng"), ("雨", "yu"),
    ("萱", "xuan"), ("颖", "ying"), ("洁", "jie"), ("倩", "qian"), ("璐", "lu"),
)
_GIVEN_NEUTRAL: Final = (
    ("文", "wen"), ("华", "hua"), ("春", "chun"), ("晓", "xiao"), ("一", "yi"),
    ("新", "xin"), ("海", "hai"), ("林", "lin"), ("安", "an"), ("宁", "ning"),
    ("嘉", "jia"), ("子", "zi"), ("思", "si"), ("云", "yun"), ("乐", "le"),
)
_GENDER_CN: Final = Weighted([("男", 46), ("女", 46), ("未知", 8)])

_WESTERN_GIVEN_MALE: Final = (
    "John", "James", "Robert", "Michael", "William", "David", "Richard", "Thomas", "Daniel",
    "Matthew", "George", "Edward", "Oliver", "Henry", "Peter",
)
_WESTERN_GIVEN_FEMALE: Final = (
    "Mary", "Elizabeth", "Sarah", "Emma", "Olivia", "Charlotte", "Emily", "Jessica", "Anna",
    "Sophie", "Grace", "Alice", "Laura", "Hannah",
)
_WESTERN_MIDDLE: Final = (
    "Fitzgerald", "Alexander", "Edward", "James", "Lee", "Marie", "Louise", "Anne", "Rose",
    "William", "Michael", "Elizabeth", "Jane", "Patrick",
)
_WESTERN_FAMILY: Final = (
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Miller", "Davis", "Wilson", "Taylor",
    "Anderson", "Thomas", "Moore", "Clark", "Walker", "Wright", "Evans", "Robinson",
    "O'Brien", "MacDonald", "Müller", "Schmidt", "Dubois",
)
# How a Western customer's gender got typed (all listed in mappings.toml [gender]).
_GENDER_WESTERN: Final = Weighted([("男", 30), ("女", 30), ("male", 15), ("female", 15),
                                   ("未知", 10)])

# --- contact details ---------------------------------------------------------------------

# Real Chinese mobile number prefixes (3 digits); the number is prefix + 8 digits.
MOBILE_PREFIXES: Final = (
    "130", "131", "132", "133", "134", "135", "136", "137", "138", "139", "145", "147",
    "150", "151", "152", "153", "155", "156", "157", "158", "159", "166", "173", "175",
    "176", "177", "178", "180", "181", "182", "183", "184", "185", "186", "187", "188",
    "189", "191", "198", "199",
)
# How people type a mobile into the CRM (index -> format_cn_mobile style).
_PHONE_STYLE: Final = Weighted([(0, 40), (1, 25), (2, 15), (3, 10), (4, 10)])
PHONE_STYLES: Final = 5


def format_cn_mobile(digits: str, style: int) -> str:
    """An 11-digit Chinese mobile as typed: 13812345678, 138 1234 5678, +86 138-1234-5678,
    0086 13812345678, +8613812345678."""
    a, b, c = digits[:3], digits[3:7], digits[7:]
    if style == 1:
        return f"{a} {b} {c}"
    if style == 2:
        return f"+86 {a}-{b}-{c}"
    if style == 3:
        return f"0086 {digits}"
    if style == 4:
        return f"+86{digits}"
    return digits


def _mobile(rng: random.Random) -> str:
    return rng.choice(MOBILE_PREFIXES) + f"{rng.randrange(100_000_000):08d}"


def _foreign_e164(rng: random.Random) -> str:
    """A fictional US (555-01xx) or UK (020 7946 0xxx) number in strict E.164.

    Both are ranges set aside for fiction that libphonenumber still finds valid; Ofcom's
    mobile drama range 07700 900xxx is not (it is unallocated, so the mapping refuses it).
    """
    if rng.random() < 0.6:
        return f"+1{rng.choice(('212', '415', '617', '312', '206'))}55501{rng.randrange(100):02d}"
    return f"+442079460{rng.randrange(1000):03d}"


_EMAIL_DOMAINS_CN: Final = Weighted([
    ("qq.com", 30), ("163.com", 20), ("126.com", 10), ("sina.com", 6), ("foxmail.com", 6),
    ("139.com", 4), ("outlook.com", 6), ("gmail.com", 4), ("hotmail.com", 3),
    ("example.com.cn", 5),
])
_EMAIL_DOMAINS_WESTERN: Final = Weighted([
    ("gmail.com", 35), ("outlook.com", 20), ("yahoo.com", 10), ("hotmail.com", 10),
    ("example.com", 15), ("qq.com", 5), ("163.com", 5),
])


def _messy_email(rng: random.Random, email: str) -> str:
    """Capitals and stray spaces, as users type them (15% / 10%)."""
    r = rng.random()
    if r < 0.08:
        local, _, domain = email.partition("@")
        email = f"{local.capitalize()}@{domain}"
    elif r < 0.15:
        email = email.upper()
    r = rng.random()
    if r < 0.05:
        email = f" {email} "
    elif r < 0.10:
        email = f"{email} "
    return email


# --- addresses -----------------------------------------------------------------------------

# (province or municipality, city, district, streets). Municipalities repeat their name as
# the city and are written once: 北京市朝阳区建国路88号.
PLACES: Final[tuple[tuple[str, str, str, tuple[str, ...]], ...]] = (
    ("北京市", "北京市", "朝阳区", ("建国路", "朝阳路", "东三环中路", "望京街")),
    ("北京市", "北京市", "海淀区", ("中关村大街", "学院路", "知春路")),
    ("北京市", "北京市", "东城区", ("东长安街", "王府井大街")),
    ("北京市", "北京市", "西城区", ("金融大街", "西单北大街")),
    ("上海市", "上海市", "浦东新区", ("世纪大道", "陆家嘴环路", "张杨路")),
    ("上海市", "上海市", "徐汇区", ("漕溪北路", "肇嘉浜路")),
    ("上海市", "上海市", "静安区", ("南京西路", "延安中路")),
    ("上海市", "上海市", "黄浦区", ("淮海中路", "西藏中路")),
    ("天津市", "天津市", "和平区", ("南京路", "滨江道")),
    ("天津市", "天津市", "南开区", ("鞍山西道",)),
    ("重庆市", "重庆市", "渝中区", ("民权路", "中山三路")),
    ("重庆市", "重庆市", "江北区", ("建新北路",)),
    ("广东省", "深圳市", "南山区", ("科技园路", "深南大道", "科苑路")),
    ("广东省", "深圳市", "福田区", ("福华路", "益田路")),
    ("广东省", "深圳市", "罗湖区", ("人民南路",)),
    ("广东省", "广州市", "天河区", ("天河路", "体育西路", "华夏路")),
    ("广东省", "广州市", "越秀区", ("北京路", "中山五路")),
    ("浙江省", "杭州市", "西湖区", ("文三路", "西溪路", "天目山路")),
    ("浙江省", "杭州市", "滨江区", ("江南大道", "网商路")),
    ("浙江省", "杭州市", "上城区", ("延安路",)),
    ("浙江省", "宁波市", "鄞州区", ("天童南路",)),
    ("江苏省", "南京市", "鼓楼区", ("中山北路", "广州路")),
    ("江苏省", "南京市", "玄武区", ("珠江路",)),
    ("江苏省", "苏州市", "姑苏区", ("人民路", "干将路")),
    ("四川省", "成都市", "武侯区", ("人民南路", "天府大道")),
    ("四川省", "成都市", "锦江区", ("春熙路",)),
    ("湖北省", "武汉市", "武昌区", ("中南路", "中北路")),
    ("湖北省", "武汉市", "洪山区", ("珞喻路",)),
    ("山东省", "济南市", "历下区", ("泉城路", "经十路")),
    ("山东省", "青岛市", "市南区", ("香港中路",)),
    ("陕西省", "西安市", "雁塔区", ("长安南路", "小寨东路")),
    ("福建省", "厦门市", "思明区", ("湖滨南路", "中山路")),
    ("湖南省", "长沙市", "岳麓区", ("麓山南路",)),
    ("湖南省", "长沙市", "芙蓉区", ("五一大道",)),
    ("河南省", "郑州市", "金水区", ("花园路", "金水路")),
)
# Big cities get more customers.
_PLACE: Final = Weighted([
    (p, 3 if p[0] in ("北京市", "上海市") or p[1] in ("深圳市", "广州市", "杭州市") else 1)
    for p in PLACES
])


def _address(rng: random.Random) -> str:
    province, city, district, streets = _PLACE.pick(rng)
    head = province if province == city else province + city
    text = f"{head}{district}{rng.choice(streets)}{rng.randint(1, 999)}号"
    r = rng.random()
    if r < 0.15:
        text += f"{rng.randint(1, 30)}栋{rng.randint(1, 32)}{rng.randint(1, 6):02d}室"
    elif r < 0.22:
        text += f"{rng.choice('ABCD')}座{rng.randint(2, 40)}{rng.randint(1, 20):02d}室"
    return text


# --- purchase history ------------------------------------------------------------------------

_FREQUENCY: Final = Weighted([
    ("每月1次", 30), ("每月2次", 10), ("每周1次", 5), ("每季度1次", 20), ("每半年1次", 12),
    ("每年1次", 10), ("每年2次", 8), ("不定期", 5),
])
_PREFERENCE: Final = Weighted([
    ("电子产品", 35), ("家用电器", 15), ("手机数码", 20), ("电脑办公", 10), ("智能穿戴", 8),
    ("影音娱乐", 6), ("摄影摄像", 4), ("智能家居", 5),
])
_ROUND_AMOUNTS: Final = (300, 500, 800, 1000, 1500, 2000, 3000, 5000, 8000, 10000, 20000)


def _purchase_amount(rng: random.Random) -> Decimal:
    if rng.random() < 0.6:
        return Decimal(rng.choice(_ROUND_AMOUNTS)).quantize(CENT)
    return (Decimal(rng.randrange(5_000, 5_000_000)) / 100).quantize(CENT)


_SHORT_NOTES: Final = (
    "VIP客户", "偏好电话联系", "要求开具增值税专用发票", "工作日白天不方便接听电话",
    "老客户，由门店转介绍", "对价格较敏感，关注促销活动", "需要送货上门安装",
    "企业采购联系人", "只接受顺丰配送", "曾投诉物流延误，已妥善处理",
)
_STAFF: Final = ("王经理", "李专员", "张顾问", "刘主管", "陈客服", "赵销售", "周工程师")
_NOTE_EVENTS: Final = (
    "客户来电咨询新款5G手机的到货时间", "回访客户，对上次购买的笔记本电脑表示满意",
    "客户反馈无线耳机左耳偶尔断连，已登记返厂检测", "为客户办理以旧换新，旧机估价已确认",
    "客户询问企业批量采购折扣，已发送报价单", "客户要求更改收货地址并重新安排配送",
    "上门安装55英寸电视，客户签收确认", "客户咨询智能手表的保修政策与延保服务",
    "客户对路由器信号覆盖不满意，建议加装Mesh节点", "客户参加门店体验活动，试用了新款相机",
    "提醒客户优惠券即将到期", "客户申请开具发票，已通过邮件发送电子发票",
    "客户希望分期付款，已说明免息分期条件", "客户投诉配送延误，补偿优惠券一张",
)


def _long_notes(rng: random.Random) -> str:
    """A service log longer than 4 KB whose numbers keep it from compressing well, so
    PostgreSQL stores it out of line (TOAST)."""
    target = LONG_NOTES_MIN_BYTES + rng.randrange(6000)
    parts: list[str] = []
    size = 0
    day = FIRST_ORDER_DATE + timedelta(days=rng.randrange(300))
    while size < target:
        day += timedelta(days=rng.randint(1, 9))
        entry = (f"{day.isoformat()} {rng.choice(_STAFF)}（工号{rng.randrange(100000):05d}）："
                 f"{rng.choice(_NOTE_EVENTS)}，工单号{rng.getrandbits(48):012x}，"
                 f"涉及金额{rng.randrange(100, 99999)}.{rng.randrange(100):02d}元。\n")
        parts.append(entry)
        size += len(entry.encode("utf-8"))
    return "".join(parts)


# --- products, orders, market demand -------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Product:
    code: str
    name: str
    prices: tuple[Decimal, ...]   # list prices, 元
    units: tuple[str, ...]        # units the CRM users type after the quantity


def _prices(*values: int) -> tuple[Decimal, ...]:
    return tuple(Decimal(v).quantize(CENT) for v in values)


PRODUCTS: Final = (
    Product("P-PHONE-5G", "5G手机", _prices(3999, 4999, 5000, 5999), ("台",)),
    Product("P-PHONE-STD", "手机", _prices(999, 1299, 1999, 2499), ("台",)),
    Product("P-LAPTOP", "笔记本电脑", _prices(4999, 5999, 6999, 8999), ("台",)),
    Product("P-TABLET", "平板电脑", _prices(1999, 2999, 3299, 4599), ("台",)),
    Product("P-EARBUDS", "无线耳机", _prices(199, 499, 899, 1299), ("个", "件", "套")),
    Product("P-WATCH", "智能手表", _prices(999, 1499, 2499), ("个", "件")),
    Product("P-TV-55", "55英寸电视", _prices(2999, 3999, 4999), ("台",)),
    Product("P-ROUTER", "路由器", _prices(199, 299, 499), ("台", "个")),
    Product("P-CAMERA", "相机", _prices(4999, 5999, 8999, 12999), ("台", "套")),
    Product("P-SPEAKER", "智能音箱", _prices(199, 399, 699), ("台", "个")),
)
_PRODUCT: Final = Weighted([(p, w) for p, w in zip(PRODUCTS, (18, 14, 10, 9, 12, 9, 6, 8, 5, 9),
                                                      strict=True)])
_DISCOUNTS: Final = ((Decimal(1), 75), (Decimal("0.95"), 10), (Decimal("0.9"), 8),
                     (Decimal("0.88"), 7))
# Price actually charged per product: a list price, sometimes discounted, to the cent.
_UNIT_PRICE: Final = {
    p.code: Weighted([((price * d).quantize(CENT, ROUND_HALF_UP), w)
                      for price in p.prices for d, w in _DISCOUNTS])
    for p in PRODUCTS
}
_QUANTITY_WEIGHTS: Final = ((1, 50), (2, 20), (3, 8), (4, 4), (5, 6), (10, 7), (20, 3), (50, 2))
_QUANTITY: Final = Weighted(_QUANTITY_WEIGHTS)
# Quantity as typed per product: the count with one of the product's units.
_QUANTITY_TEXT: Final = {
    p.code: Weighted([(f"{n}{unit}", w) for n, w in _QUANTITY_WEIGHTS for unit in p.units])
    for p in PRODUCTS
}
_LINES: Final = Weighted([(1, 50), (2, 28), (3, 14), (4, 8)])
# Status of a loaded order: older orders are mostly finished, recent ones mostly open.
_STATUS_OLD: Final = Weighted([(PENDING, 10), (PAID, 10), (SHIPPED, 12), (COMPLETED, 60),
                               (CANCELLED, 8)])
_STATUS_RECENT: Final = Weighted([(PENDING, 30), (PAID, 25), (SHIPPED, 20), (COMPLETED, 20),
                                  (CANCELLED, 5)])

# (kind, product category, content)
DEMAND_TEXTS: Final = (
    ("市场趋势", "手机", "5G手机市场增长迅速"),
    ("市场趋势", "手机", "三四线城市5G手机换机需求集中释放"),
    ("市场趋势", "智能穿戴", "智能手表在年轻用户中的渗透率持续提升"),
    ("市场趋势", "笔记本电脑", "开学季带动笔记本电脑需求明显上升"),
    ("市场趋势", "电视", "大屏电视以旧换新需求旺盛"),
    ("市场趋势", "音频设备", "无线耳机进入存量竞争阶段，价格持续下探"),
    ("市场趋势", "智能家居", "智能音箱和路由器随智能家居套装销量同比增长"),
    ("市场趋势", "平板电脑", "618期间平板电脑销量同比增长约20%"),
    ("客户需求反馈", "手机", "客户对手机拍照功能要求较高"),
    ("客户需求反馈", "笔记本电脑", "客户希望笔记本电脑续航超过12小时"),
    ("客户需求反馈", "智能穿戴", "客户反映智能手表表带容易磨损"),
    ("客户需求反馈", "网络设备", "客户希望路由器支持Wi-Fi 6和Mesh组网"),
    ("客户需求反馈", "电视", "客户关注电视的护眼功能和上门安装服务"),
    ("客户需求反馈", "音频设备", "客户希望延长无线耳机的保修期"),
    ("客户需求反馈", "相机", "客户对相机防抖性能要求较高"),
    ("客户需求反馈", "电子产品", "客户希望提供分期付款和以旧换新服务"),
    ("竞争对手分析", "电子产品", "竞争对手在价格和售后服务方面具有一定优势"),
    ("竞争对手分析", "手机", "竞争对手推出低价5G手机，抢占入门市场"),
    ("竞争对手分析", "平板电脑", "竞品平板电脑在教育市场的渠道覆盖更广"),
    ("竞争对手分析", "电子产品", "竞争对手加大线上直播带货投入"),
    ("竞争对手分析", "智能家居", "竞品智能音箱与自有生态绑定更紧密"),
    ("竞争对手分析", "电子产品", "竞争对手缩短配送时效，主要城市支持次日达"),
)
_OBSERVED_FROM: Final = datetime(2023, 1, 1, tzinfo=UTC)
_OBSERVED_SPAN_S: Final = int((datetime(2025, 6, 30, tzinfo=UTC) - _OBSERVED_FROM).total_seconds())
_REGIONS: Final = ("华东地区", "华南地区", "华北地区", "西南地区", "华中地区", "一线城市")


# --- rows ---------------------------------------------------------------------------------

class Customer(NamedTuple):
    """A crm.customers row, fields in column order (customer_id chosen by the caller,
    updated_at left to the database). `Customer._fields` are the column names."""

    customer_id: int
    family_name: str
    given_name: str
    middle_name: str | None
    name_order: str
    gender: str
    birth_date: date | None
    phone: str | None
    email: str | None
    address: str | None
    purchase_frequency: str | None
    purchase_amount: Decimal | None
    product_preference: str | None
    notes: str | None


class SalesOrder(NamedTuple):
    """A crm.sales_orders row, fields in column order (updated_at left to the database)."""

    order_id: int
    order_no: str
    customer_id: int
    order_date: date
    status: str
    currency: str


class OrderLine(NamedTuple):
    """A crm.order_lines row, fields in column order."""

    order_id: int
    line_no: int
    customer_id: int      # always the order's customer_id
    product_code: str
    product_name: str
    quantity: str         # with its unit: '10台'
    unit_price: Decimal   # exactly two decimals


class Order(NamedTuple):
    header: SalesOrder
    lines: tuple[OrderLine, ...]


class MarketDemand(NamedTuple):
    """A crm.market_demand row without demand_id (left to the identity column)."""

    kind: str
    product_category: str
    content: str
    observed_at: datetime  # aware, UTC


def order_no_for(order_id: int, order_date: date) -> str:
    """'20230101' + the order id, at least 6 digits: unique because the id is."""
    return f"{_yyyymmdd(order_date)}{order_id:06d}"


@lru_cache(maxsize=4096)
def _yyyymmdd(day: date) -> str:
    return f"{day:%Y%m%d}"


def quantity_text(count: int, unit: str) -> str:
    return f"{count}{unit}"


# --- the generator ---------------------------------------------------------------------------

class DemoGenerator:
    """Deterministic rows from one seed. Customers, orders, market demand and changes each
    draw from their own stream, so asking for more of one does not change the others."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._customers = random.Random(f"{seed}/customers")
        self._orders = random.Random(f"{seed}/orders")
        self._demand = random.Random(f"{seed}/demand")
        self._changes = random.Random(f"{seed}/changes")

    # customers ---------------------------------------------------------------------------
    def customer(self, customer_id: int) -> Customer:
        rng = self._customers
        if rng.random() < WESTERN_SHARE:
            return self._western(customer_id)
        family, family_py = _FAMILY.pick(rng)
        gender = _GENDER_CN.pick(rng)
        pool = (_GIVEN_MALE if gender == "男" else _GIVEN_FEMALE if gender == "女"
                else _GIVEN_MALE + _GIVEN_FEMALE)
        first = rng.choice(pool if rng.random() < 0.7 else _GIVEN_NEUTRAL)
        chars = [first]
        if rng.random() < 0.7:  # two-character given names are the most common
            chars.append(first if rng.random() < 0.05 else rng.choice(pool))
        given = "".join(c for c, _ in chars)
        given_py = "".join(p for _, p in chars)
        birth = self._birth_date(rng)
        frequency, amount, preference, notes = self._purchase_history(rng)
        email: str | None = None
        if rng.random() < 0.9:
            email = _messy_email(rng, self._cn_email(rng, family_py, given_py, birth))
        return Customer(
            customer_id=customer_id,
            family_name=family,
            given_name=given,
            middle_name=None,
            name_order="eastern",
            gender=gender,
            birth_date=birth,
            phone=(format_cn_mobile(_mobile(rng), _PHONE_STYLE.pick(rng))
                   if rng.random() < 0.97 else None),
            email=email,
            address=_address(rng) if rng.random() < 0.95 else None,
            purchase_frequency=frequency, purchase_amount=amount,
            product_preference=preference, notes=notes,
        )

    def _western(self, customer_id: int) -> Customer:
        rng = self._customers
        gender = _GENDER_WESTERN.pick(rng)
        female = gender in ("女", "female") or (gender == "未知" and rng.random() < 0.5)
        given = rng.choice(_WESTERN_GIVEN_FEMALE if female else _WESTERN_GIVEN_MALE)
        middle = rng.choice(_WESTERN_MIDDLE) if rng.random() < 0.6 else None
        family = rng.choice(_WESTERN_FAMILY)
        local = f"{given}.{family}".lower().replace("'", "").replace("ü", "ue")
        if rng.random() < 0.3:
            local += str(rng.randint(1, 99))
        # Expats in China mostly have a local mobile; the others an E.164 home number.
        phone = (format_cn_mobile(_mobile(rng), _PHONE_STYLE.pick(rng)) if rng.random() < 0.5
                 else _foreign_e164(rng))
        frequency, amount, preference, notes = self._purchase_history(rng)
        return Customer(
            customer_id=customer_id,
            family_name=family,
            given_name=given,
            middle_name=middle,
            name_order="western",
            gender=gender,
            birth_date=self._birth_date(rng),
            phone=phone,
            email=_messy_email(rng, f"{local}@{_EMAIL_DOMAINS_WESTERN.pick(rng)}"),
            address=_address(rng) if rng.random() < 0.9 else None,
            purchase_frequency=frequency, purchase_amount=amount,
            product_preference=preference, notes=notes,
        )

    @staticmethod
    def _birth_date(rng: random.Random) -> date | None:
        if rng.random() < 0.05:
            return None
        return BIRTH_FROM + timedelta(days=rng.randrange((BIRTH_TO - BIRTH_FROM).days + 1))

    @staticmethod
    def _cn_email(rng: random.Random, family: str, given: str, birth: date | None) -> str:
        domain = _EMAIL_DOMAINS_CN.pick(rng)
        if domain == "qq.com" and rng.random() < 0.6:
            return f"{rng.randrange(10_000_000, 3_000_000_000)}@qq.com"
        style = rng.randrange(4)
        if style == 0:
            local = family + given
        elif style == 1:
            local = f"{given}.{family}"
        elif style == 2:
            local = f"{family}{given}{birth.year % 100:02d}" if birth else f"{family}{given}88"
        else:
            local = f"{family}_{given}{rng.randint(1, 999)}"
        return f"{local}@{domain}"

    @staticmethod
    def _purchase_history(
        rng: random.Random,
    ) -> tuple[str | None, Decimal | None, str | None, str | None]:
        """(purchase_frequency, purchase_amount, product_preference, notes)"""
        r = rng.random()
        notes: str | None = None
        if r < LONG_NOTES_SHARE:
            notes = _long_notes(rng)
        elif r < 0.2:
            notes = rng.choice(_SHORT_NOTES)
        buyer = rng.random() < 0.9
        return (_FREQUENCY.pick(rng) if buyer else None,
                _purchase_amount(rng) if buyer else None,
                _PREFERENCE.pick(rng) if rng.random() < 0.85 else None,
                notes)

    # orders ------------------------------------------------------------------------------
    def orders(self, order_ids: Sequence[int], customer_ids: Sequence[int]) -> Iterator[Order]:
        """One order per id, dates rising with the id from 2023-01-01 to 2025-06-30, spread
        over the customers with a long tail (a few customers order a lot)."""
        if not order_ids:
            return
        if not customer_ids:
            raise ValueError("orders need at least one customer")
        rng = self._orders
        buyers = Weighted([(cid, rng.paretovariate(1.2)) for cid in customer_ids])
        span = (LAST_ORDER_DATE - FIRST_ORDER_DATE).days
        n = len(order_ids)
        for i, order_id in enumerate(order_ids):
            day = FIRST_ORDER_DATE + timedelta(days=span * i // n)
            yield self.order(order_id, buyers.pick(rng), day, recent=i >= n // 2)

    def order(self, order_id: int, customer_id: int, order_date: date, *,
              recent: bool = False) -> Order:
        rng = self._orders
        status = (_STATUS_RECENT if recent else _STATUS_OLD).pick(rng)
        header = SalesOrder(order_id, order_no_for(order_id, order_date), customer_id,
                            order_date, status, CURRENCY)
        products: list[Product] = []
        wanted = _LINES.pick(rng)
        while len(products) < wanted:
            p = _PRODUCT.pick(rng)
            if p not in products:
                products.append(p)
        lines = tuple(
            OrderLine(order_id, line_no, customer_id, p.code, p.name,
                      _QUANTITY_TEXT[p.code].pick(rng),
                      _UNIT_PRICE[p.code].pick(rng))
            for line_no, p in enumerate(products, start=1)
        )
        return Order(header, lines)

    # market demand -------------------------------------------------------------------------
    def market_demand(self) -> MarketDemand:
        rng = self._demand
        kind, category, content = rng.choice(DEMAND_TEXTS)
        if rng.random() < 0.4:
            content = f"{rng.choice(_REGIONS)}：{content}"
        return MarketDemand(kind, category, content,
                            _OBSERVED_FROM + timedelta(seconds=rng.randrange(_OBSERVED_SPAN_S)))

    # changes -------------------------------------------------------------------------------
    def change_planner(self) -> ChangePlanner:
        """A planner fed with what was inserted (`add_customer`, `add_order`)."""
        return ChangePlanner(self._changes, self)


# --- follow-up changes -------------------------------------------------------------------

UPDATABLE_CUSTOMER_COLUMNS: Final = frozenset({
    "phone", "email", "address", "purchase_frequency", "purchase_amount",
    "product_preference",
})


@dataclass(frozen=True, slots=True)
class CustomerUpdate:
    customer_id: int
    values: tuple[tuple[str, str | Decimal | None], ...]  # (column, new value)


@dataclass(frozen=True, slots=True)
class OrderStatusChange:
    order_id: int
    customer_id: int
    old_status: str
    status: str


@dataclass(frozen=True, slots=True)
class LineQuantityChange:
    order_id: int
    customer_id: int
    line_no: int
    quantity: str
    touch_order: bool  # the order screen also bumps the header's updated_at


@dataclass(frozen=True, slots=True)
class OrderDelete:
    order_id: int
    customer_id: int
    lines: int  # deleted with it (ON DELETE CASCADE)


@dataclass(frozen=True, slots=True)
class CustomerDelete:
    customer_id: int
    orders: int  # deleted with it (ON DELETE CASCADE)
    lines: int


@dataclass(frozen=True, slots=True)
class MarketDemandInsert:
    """A new market-demand record; ``demand_id`` None leaves its key to the identity
    default (as the CRM's own inserts do), an int is a key the loader reserved (a table
    holding explicitly keyed rows ahead of its sequence: see service.demo.load)."""

    row: MarketDemand
    demand_id: int | None = None


Change = (CustomerUpdate | OrderStatusChange | LineQuantityChange | OrderDelete
          | CustomerDelete | MarketDemandInsert)

# Next status: 待付款 -> 已付款 -> 已发货 -> 已完成; unpaid or paid orders may be cancelled.
_NEXT_STATUS: Final = {
    PENDING: Weighted([(PAID, 85), (CANCELLED, 15)]),
    PAID: Weighted([(SHIPPED, 90), (CANCELLED, 10)]),
    SHIPPED: Weighted([(COMPLETED, 1)]),
}
_EDITABLE: Final = frozenset({PENDING, PAID})
_CHANGE_KIND: Final = Weighted([
    ("customer_update", 30), ("order_status", 38), ("line_quantity", 18),
    ("demand_insert", 6), ("order_delete", 5), ("customer_delete", 3),
])
_CUSTOMER_EDIT: Final = Weighted([
    ("phone_retyped", 20), ("phone_new", 15), ("address", 20), ("email", 20),
    ("purchase", 15), ("phone_and_address", 10),
])


class _Bag:
    """A set of ints with O(1) add, discard and uniform random choice (deterministic)."""

    __slots__ = ("_items", "_pos")

    def __init__(self) -> None:
        self._items: list[int] = []
        self._pos: dict[int, int] = {}

    def add(self, item: int) -> None:
        if item not in self._pos:
            self._pos[item] = len(self._items)
            self._items.append(item)

    def discard(self, item: int) -> None:
        pos = self._pos.pop(item, None)
        if pos is None:
            return
        last = self._items.pop()
        if pos < len(self._items):
            self._items[pos] = last
            self._pos[last] = pos

    def choice(self, rng: random.Random) -> int:
        return self._items[int(rng.random() * len(self._items))]

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item: int) -> bool:
        return item in self._pos


@dataclass(slots=True)
class _OrderState:
    customer_id: int
    status: str
    units: list[str]  # per line, line_no = index + 1


@dataclass(slots=True)
class _CustomerState:
    mobile: str | None      # 11 digits, or a foreign E.164 number
    email: str | None
    orders: set[int]


class ChangePlanner:
    """Plans realistic follow-up changes to rows that were inserted: contact edits,
    orders moving through their statuses, quantity corrections, a few deletes. It keeps
    just enough state (per customer: phone, e-mail, orders; per order: status, line units)
    that every planned change applies to a row that still exists."""

    def __init__(self, rng: random.Random, gen: DemoGenerator) -> None:
        self._rng = rng
        self._gen = gen
        self._customers: dict[int, _CustomerState] = {}
        self._alive_customers = _Bag()
        self._long_notes = _Bag()
        self._orders: dict[int, _OrderState] = {}
        self._alive_orders = _Bag()
        self._open_orders = _Bag()      # can move on to another status
        self._editable_orders = _Bag()  # lines can still be edited (not paid for / shipped)
        self._planners: dict[str, Callable[[], Change | None]] = {
            "customer_update": self._customer_update, "order_status": self._order_status,
            "line_quantity": self._line_quantity, "demand_insert": self._demand_insert,
            "order_delete": self._order_delete, "customer_delete": self._customer_delete,
        }

    def add_customer(self, c: Customer) -> None:
        mobile: str | None = None
        if c.phone is not None:
            mobile = c.phone if c.phone.startswith("+") and not c.phone.startswith("+86") \
                else "".join(ch for ch in c.phone if ch.isdigit())[-11:]
        self._customers[c.customer_id] = _CustomerState(mobile, c.email, set())
        self._alive_customers.add(c.customer_id)
        if c.notes is not None and len(c.notes) > 1000:
            self._long_notes.add(c.customer_id)

    def add_order(self, order: Order) -> None:
        h = order.header
        units = [line.quantity.lstrip("0123456789.") for line in order.lines]
        self._orders[h.order_id] = _OrderState(h.customer_id, h.status, units)
        self._customers[h.customer_id].orders.add(h.order_id)
        self._alive_orders.add(h.order_id)
        self._index_status(h.order_id, h.status)

    def _index_status(self, order_id: int, status: str) -> None:
        if status in _NEXT_STATUS:
            self._open_orders.add(order_id)
        else:
            self._open_orders.discard(order_id)
        if status in _EDITABLE:
            self._editable_orders.add(order_id)
        else:
            self._editable_orders.discard(order_id)

    def plan(self, count: int) -> Iterator[Change]:
        """Up to `count` changes (fewer only when nothing is left to change)."""
        for _ in range(count):
            change = self._next()
            if change is None:
                return
            yield change

    def _next(self) -> Change | None:
        planners = self._planners
        first = _CHANGE_KIND.pick(self._rng)
        # When the drawn kind cannot apply (no open order left, say), fall back in order.
        for kind in (first, "order_status", "line_quantity", "customer_update",
                     "demand_insert"):
            change = planners[kind]()
            if change is not None:
                return change
        return None

    # each returns None when it cannot apply (e.g. no open order left)
    def _customer_update(self) -> CustomerUpdate | None:
        rng = self._rng
        if not self._alive_customers:
            return None
        if self._long_notes and rng.random() < 0.1:  # unchanged TOASTed notes on update
            cid = self._long_notes.choice(rng)
        else:
            cid = self._alive_customers.choice(rng)
        state = self._customers[cid]
        edit = _CUSTOMER_EDIT.pick(rng)
        values: list[tuple[str, str | Decimal | None]] = []
        if edit in ("phone_retyped", "phone_new", "phone_and_address"):
            if edit == "phone_retyped" and state.mobile is not None:
                mobile = state.mobile
            else:
                mobile = _mobile(rng)
            state.mobile = mobile
            values.append(("phone", mobile if mobile.startswith("+")
                           else format_cn_mobile(mobile, rng.randrange(PHONE_STYLES))))
        if edit in ("address", "phone_and_address"):
            values.append(("address", _address(rng)))
        if edit == "email":
            old = state.email
            if old is not None and old != old.strip().lower():
                new = old.strip().lower()  # someone tidied it up
            else:
                local = (old or "customer").strip().lower().partition("@")[0]
                new = _messy_email(rng, f"{local}{rng.randint(1, 999)}@"
                                        f"{_EMAIL_DOMAINS_CN.pick(rng)}")
            state.email = new
            values.append(("email", new))
        if edit == "purchase":
            values.append(("purchase_frequency", _FREQUENCY.pick(rng)))
            values.append(("purchase_amount", _purchase_amount(rng)))
            if rng.random() < 0.3:
                values.append(("product_preference", _PREFERENCE.pick(rng)))
        return CustomerUpdate(cid, tuple(values))

    def _order_status(self) -> OrderStatusChange | None:
        if not self._open_orders:
            return None
        oid = self._open_orders.choice(self._rng)
        state = self._orders[oid]
        new = _NEXT_STATUS[state.status].pick(self._rng)
        change = OrderStatusChange(oid, state.customer_id, state.status, new)
        state.status = new
        self._index_status(oid, new)
        return change

    def _line_quantity(self) -> LineQuantityChange | None:
        if not self._editable_orders:
            return None
        rng = self._rng
        oid = self._editable_orders.choice(rng)
        state = self._orders[oid]
        line_no = rng.randrange(len(state.units)) + 1
        return LineQuantityChange(oid, state.customer_id, line_no,
                                  quantity_text(_QUANTITY.pick(rng), state.units[line_no - 1]),
                                  touch_order=rng.random() < 0.75)

    def _demand_insert(self) -> MarketDemandInsert:
        return MarketDemandInsert(self._gen.market_demand())

    def _order_delete(self) -> OrderDelete | None:
        if not self._alive_orders:
            return None
        oid = self._alive_orders.choice(self._rng)
        state = self._drop_order(oid)
        self._customers[state.customer_id].orders.discard(oid)
        return OrderDelete(oid, state.customer_id, len(state.units))

    def _customer_delete(self) -> CustomerDelete | None:
        if not self._alive_customers:
            return None
        cid = self._alive_customers.choice(self._rng)
        state = self._customers.pop(cid)
        self._alive_customers.discard(cid)
        self._long_notes.discard(cid)
        lines = sum(len(self._drop_order(oid).units) for oid in sorted(state.orders))
        return CustomerDelete(cid, len(state.orders), lines)

    def _drop_order(self, oid: int) -> _OrderState:
        state = self._orders.pop(oid)
        self._alive_orders.discard(oid)
        self._open_orders.discard(oid)
        self._editable_orders.discard(oid)
        return state
