"""Writes tests/data/format_golden.csv: messy CRM values and what the ERP must hold.

Run once (``python tests/data/make_format_golden.py``) when the cases change; the CSV is what
the tests read. The expected values are built here from the sources, not from the transform:
- addresses: division codes and names read straight from service/erp/data/*.csv (the NBS
  2023 list), with messy spellings wrapped around them;
- phones: E.164 written by hand from the numbering plans (CN: +86, area code without its
  trunk 0, subscriber number; mobiles 1[3-9]x) and, abroad, from libphonenumber's own example
  numbers; the ``check`` column names the number type libphonenumber's metadata must give
  (test_golden.py checks it independently of the transform);
- names, quantities, statuses, genders: written by hand.

Columns: category, input, expected, check. ``expected`` starting with ``!`` is the expected
dead-letter reason (a substring). Several inputs in one cell are separated by `` | ``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "service" / "erp" / "data"
rows: list[tuple[str, str, str, str]] = []


def add(category: str, value: str, expected: str, check: str = "") -> None:
    rows.append((category, value, expected, check))


# --- phones ------------------------------------------------------------------------------
MOBILES = [
    "13800138000",
    "13912345678",
    "15012345678",
    "18612345678",
    "17712345678",
    "19912345678",
    "16612345678",
    "14712345678",
    "13512345678",
    "18912345678",
]
for i, mob in enumerate(MOBILES):
    e = "+86" + mob
    spaced = f"{mob[:3]} {mob[3:7]} {mob[7:]}"
    dashed = f"{mob[:3]}-{mob[3:7]}-{mob[7:]}"
    variants = [
        mob,
        spaced,
        dashed,
        "+86 " + spaced,
        "0086" + mob,
        "(+86)" + mob,
        "+86-" + dashed,
        spaced + "（微信同号）",
        "手机：" + mob,
        mob.translate(str.maketrans("0123456789", "０１２３４５６７８９")),
    ]
    for v in variants[: 10 if i < 3 else 4]:
        add("phone", v, e, "MOBILE")

LANDLINES = [
    ("010", "65521234"),
    ("021", "61234567"),
    ("020", "83123456"),
    ("0755", "86013388"),
    ("0891", "6834567"),
    ("0571", "88888888"),
    ("022", "23456789"),
    ("023", "63123456"),
    ("025", "84123456"),
    ("027", "85123456"),
    ("028", "85123456"),
    ("029", "87123456"),
    ("0512", "65123456"),
    ("0532", "83123456"),
    ("0871", "63123456"),
]
for i, (area, sub) in enumerate(LANDLINES):
    e = "+86" + area[1:] + sub
    variants = [
        f"{area}-{sub}",
        f"({area}) {sub[:4]} {sub[4:]}",
        f"+86 {area[1:]} {sub}",
        f"+86 (0){area[1:]} {sub}",
        f"0086-{area[1:]}-{sub}",
        f"{area}{sub}",
    ]
    for v in variants[: 6 if i < 4 else 2]:
        add("phone", v, e, "FIXED_LINE")
for text, e, ext in [
    ("010-65521234转123", "+861065521234", "123"),
    ("010-65521234 转 8001", "+861065521234", "8001"),
    ("021-61234567分机25", "+862161234567", "25"),
    ("0755-86013388 ext. 9", "+8675586013388", "9"),
    ("0755-86013388 x12", "+8675586013388", "12"),
    ("020-83123456#601", "+862083123456", "601"),
    ("0755-12345678-8001", "+8675512345678", "8001"),
]:
    add("phone", text, f"{e};ext={ext}", "FIXED_LINE")
add("phone", "400-810-8888", "+864008108888", "SHARED_COST")
add("phone", "4008108888", "+864008108888", "SHARED_COST")
add("phone", "800-820-8820", "+868008208820", "TOLL_FREE")
for text, expected in [
    ("0891-6834567/8", "+868916834567 | +868916834568"),
    ("010-65521234/35", "+861065521234 | +861065521235"),
    ("13800138000/13912345678", "+8613800138000 | +8613912345678"),
    ("13800138000、13912345678", "+8613800138000 | +8613912345678"),
    ("13800138000, 010-65521234", "+8613800138000 | +861065521234"),
    ("13800138000；13912345678", "+8613800138000 | +8613912345678"),
    ("13800138000 或 13912345678", "+8613800138000 | +8613912345678"),
    ("138 0013 8000（微信同号）/ 010-65521234转123", "+8613800138000 | +861065521234;ext=123"),
]:
    add("phone", text, expected, "")
for word in [
    "",
    "   ",
    "无",
    "暂无",
    "没有",
    "无号码",
    "-",
    "－",
    "—",
    "--",
    "/",
    "N/A",
    "none",
    "NULL",
]:
    add("phone", word, "None", "")
for masked in [
    "138xxxx5678",
    "138XXXX5678",
    "138****5678",
    "138＊＊＊＊5678",
    "1381234****",
    "010-6552****",
    "138…5678",
    "138????5678",
]:
    add("phone", masked, "!masked", "")
for bad, why in [
    ("12345678", "!invalid"),
    ("1381234567", "!invalid"),
    ("23812345678", "!invalid"),
    ("0571-8888888", "!invalid"),
    ("+86 12345", "!invalid"),
    ("call me", "!no phone number"),
    ("微信", "!no phone number"),
    ("13800138000/call me", "!no phone number"),
    ("+1 23", "!invalid"),
    ("+999 1234567", "!unknown country code"),
]:
    add("phone", bad, why, "")
INTERNATIONAL = [
    ("+44 (0)20 7946 0958", "+442079460958", "FIXED_LINE"),
    ("+44 7400 123456", "+447400123456", "MOBILE"),
    ("0044 121 234 5678", "+441212345678", "FIXED_LINE"),
    ("+1 201-555-0123", "+12015550123", "FIXED_LINE_OR_MOBILE"),
    ("+1 (201) 555-0123", "+12015550123", "FIXED_LINE_OR_MOBILE"),
    ("+852 5123 4567", "+85251234567", "MOBILE"),
    ("00852 2123 4567", "+85221234567", "FIXED_LINE"),
    ("+81 90-1234-5678", "+819012345678", "MOBILE"),
    ("+81 3-1234-5678", "+81312345678", "FIXED_LINE"),
    ("+49 30 123456", "+4930123456", "FIXED_LINE"),
    ("+49 1512 3456789", "+4915123456789", "MOBILE"),
    ("+65 8123 4567", "+6581234567", "MOBILE"),
    ("+61 412 345 678", "+61412345678", "MOBILE"),
    ("+33 6 12 34 56 78", "+33612345678", "MOBILE"),
    ("+886 912 345 678", "+886912345678", "MOBILE"),
    ("+853 6612 3456", "+85366123456", "MOBILE"),
    ("+82 10-2000-0000", "+821020000000", "MOBILE"),
    ("+91 81234 56789", "+918123456789", "MOBILE"),
    ("＋４４ ２０ ７９４６ ０９５８", "+442079460958", "FIXED_LINE"),
]
for text, e, kind in INTERNATIONAL:
    add("phone", text, e, kind)
add("phone", "+1 (201) 555-0123 ext. 45", "+12015550123;ext=45", "FIXED_LINE_OR_MOBILE")

# --- addresses: built from the division list itself --------------------------------------


def read(name: str) -> list[dict[str, str]]:
    with open(DATA / name, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


provinces = {r["code"]: r["name"] for r in read("provinces.csv")}
cities = {r["code"]: r for r in read("cities.csv")}
areas = [
    r
    for r in read("areas.csv")
    if not 71 <= int(r["code"][4:]) <= 80 and not r["code"].endswith("00")
]
city_names = [c["name"] for c in cities.values()]
area_names = [a["name"] for a in areas]
with open(DATA / "HK-MO-TW.json", encoding="utf-8") as _fh:
    # Districts of Hong Kong, Macao and Taiwan share names with mainland ones (大安区).
    area_names += [d for groups in json.load(_fh).values() for ds in groups.values() for d in ds]
MUNICIPAL = {"11", "12", "31", "50"}
STREETS = ["人民路1号", "解放大道88号", "建设街3号", "中山路100号", "幸福小区5栋"]
SHORT = {
    "北京市": "北京",
    "天津市": "天津",
    "上海市": "上海",
    "重庆市": "重庆",
    "内蒙古自治区": "内蒙古",
    "广西壮族自治区": "广西",
    "西藏自治区": "西藏",
    "宁夏回族自治区": "宁夏",
    "新疆维吾尔自治区": "新疆",
}


def addr(p: str, c: str | None, d: str | None, street: str | None, code: str) -> str:
    return "|".join([p, c or "", d or "", street or "", code])


sample = [
    a
    for a in areas
    if a["provinceCode"] not in MUNICIPAL
    and cities[a["cityCode"]]["name"] not in ("省直辖县级行政区划", "自治区直辖县级行政区划")
][::37]
for n, a in enumerate(sample):
    p = provinces[a["provinceCode"]]
    c = cities[a["cityCode"]]["name"]
    d, code = a["name"], a["code"]
    st = STREETS[n % len(STREETS)]
    add("address", f"{p}{c}{d}{st}", addr(p, c, d, st, code), "division")
    short = SHORT.get(p, p.removesuffix("省"))
    if n % 3 == 0:
        add("address", f"{short}{c}{d}{st}", addr(p, c, d, st, code), "division")
    if n % 3 == 1:
        add("address", f"中国 {p} {c} {d} {st}", addr(p, c, d, st, code), "division")
    if n % 3 == 2 and city_names.count(c) == 1:
        add("address", f"{c}{d}{st}", addr(p, c, d, st, code), "division")
    if n % 4 == 0 and area_names.count(d) == 1:
        add("address", f"{d}{st}", addr(p, c, d, st, code), "division")
for a in [a for a in areas if a["provinceCode"] in MUNICIPAL][::9]:
    p = provinces[a["provinceCode"]]
    d, code = a["name"], a["code"]
    for text in (
        f"{p}{d}建国路88号",
        f"{p}{p}{d}建国路88号",
        f"{p}市辖区{d}建国路88号",
        f"{SHORT[p]}{d}建国路88号",
    ):
        add("address", text, addr(p, p, d, "建国路88号", code), "division")
SPECIAL = [
    (
        "海南藏族自治州共和县恰卜恰镇",
        addr("青海省", "海南藏族自治州", "共和县", "恰卜恰镇", "632521"),
    ),
    ("青海省海南藏族自治州共和县", addr("青海省", "海南藏族自治州", "共和县", "", "632521")),
    (
        "内蒙古锡林郭勒盟锡林浩特市额尔敦路",
        addr("内蒙古自治区", "锡林郭勒盟", "锡林浩特市", "额尔敦路", "152502"),
    ),
    (
        "内蒙古自治区呼伦贝尔市鄂温克族自治旗巴彦托海镇",
        addr("内蒙古自治区", "呼伦贝尔市", "鄂温克族自治旗", "巴彦托海镇", "150724"),
    ),
    (
        "吉林省延边朝鲜族自治州延吉市人民路",
        addr("吉林省", "延边朝鲜族自治州", "延吉市", "人民路", "222401"),
    ),
    ("吉林省吉林市船营区北京路", addr("吉林省", "吉林市", "船营区", "北京路", "220204")),
    ("吉林市船营区北京路", addr("吉林省", "吉林市", "船营区", "北京路", "220204")),
    ("湖北省仙桃市干河街道", addr("湖北省", "仙桃市", "", "干河街道", "429004")),
    ("湖北省神农架林区松柏镇", addr("湖北省", "神农架林区", "", "松柏镇", "429021")),
    ("广东省东莞市南城街道鸿福路", addr("广东省", "东莞市", "", "南城街道鸿福路", "441900")),
    ("广东省中山市石岐街道", addr("广东省", "中山市", "", "石岐街道", "442000")),
    ("海南省儋州市那大镇", addr("海南省", "儋州市", "", "那大镇", "460400")),
    ("深圳市南山区科技园", addr("广东省", "深圳市", "南山区", "科技园", "440305")),
    ("广东深圳南山区科技园", addr("广东省", "深圳市", "南山区", "科技园", "440305")),
    ("广东省深圳市", addr("广东省", "深圳市", "", "", "440300")),
    ("广东省", addr("广东省", "", "", "", "440000")),
    ("上海市上海市浦东新区张江路1号", addr("上海市", "上海市", "浦东新区", "张江路1号", "310115")),
    ("北京市市辖区朝阳区建国路88号", addr("北京市", "北京市", "朝阳区", "建国路88号", "110105")),
    (
        "100020 北京市 朝阳区 建国路 88号",
        addr("北京市", "北京市", "朝阳区", "建国路 88号", "110105"),
    ),
    ("北京朝阳区建国路88号", addr("北京市", "北京市", "朝阳区", "建国路88号", "110105")),
    ("重庆市巫山县广东中路1号", addr("重庆市", "重庆市", "巫山县", "广东中路1号", "500237")),
    ("浦东新区世纪大道100号", addr("上海市", "上海市", "浦东新区", "世纪大道100号", "310115")),
    (
        "新疆维吾尔自治区乌鲁木齐市新市区北京南路",
        addr("新疆维吾尔自治区", "乌鲁木齐市", "新市区", "北京南路", "650104"),
    ),
    ("山东省济南市市中区经七路", addr("山东省", "济南市", "市中区", "经七路", "370103")),
    ("西藏阿里地区噶尔县", addr("西藏自治区", "阿里地区", "噶尔县", "", "542523")),
    (
        "香港特别行政区中西区皇后大道中1号",
        addr("香港特别行政区", "香港特别行政区", "中西区", "皇后大道中1号", "810000"),
    ),
    (
        "香港特別行政區中西區皇后大道中1號",
        addr("香港特别行政区", "香港特别行政区", "中西区", "皇后大道中1號", "810000"),
    ),
    (
        "香港九龙城区太子道西",
        addr("香港特别行政区", "香港特别行政区", "九龙城区", "太子道西", "810000"),
    ),
    (
        "澳门特别行政区大堂区新马路",
        addr("澳门特别行政区", "澳门特别行政区", "大堂区", "新马路", "820000"),
    ),
    ("台湾省台北市信义区市府路1号", addr("台湾省", "台北市", "信义区", "市府路1号", "710000")),
    ("台北市信义区市府路1号", addr("台湾省", "台北市", "信义区", "市府路1号", "710000")),
    ("信义区市府路1号", "!ambiguous"),
    ("中西区皇后大道中1号", "!ambiguous"),
    ("ＮＯ.５ 广东省深圳市南山区", "!no Chinese province"),
    ("北京东路100号", "!no Chinese province"),
    ("南京路100号", "!no Chinese province"),
    ("上海东路1号", "!no Chinese province"),
    ("123 Main Street, Springfield", "!no Chinese province"),
    ("", "!empty"),
    ("   ", "!empty"),
    ("朝阳区建国路88号", "!ambiguous"),
    ("南山区科技园", "!ambiguous"),
    ("鼓楼区中山路1号", "!ambiguous"),
    ("市中区经七路", "!ambiguous"),
    # N8: abbreviations as CRM users type them, and a district not of the place written
    ("北京市朝阳区", addr("北京市", "北京市", "朝阳区", "", "110105")),
    ("北京", addr("北京市", "北京市", "", "", "110000")),
    ("广东", addr("广东省", "", "", "", "440000")),
    ("浙江", addr("浙江省", "", "", "", "330000")),
    ("新疆", addr("新疆维吾尔自治区", "", "", "", "650000")),
    ("内蒙古", addr("内蒙古自治区", "", "", "", "150000")),
    ("香港", addr("香港特别行政区", "香港特别行政区", "", "", "810000")),
    ("澳门", addr("澳门特别行政区", "澳门特别行政区", "", "", "820000")),
    ("台湾", addr("台湾省", "", "", "", "710000")),
    ("广东深圳", addr("广东省", "深圳市", "", "", "440300")),
    ("浙江杭州", addr("浙江省", "杭州市", "", "", "330100")),
    ("新疆乌鲁木齐", addr("新疆维吾尔自治区", "乌鲁木齐市", "", "", "650100")),
    ("上海浦东", addr("上海市", "上海市", "浦东新区", "", "310115")),
    ("北京朝阳", addr("北京市", "北京市", "朝阳区", "", "110105")),
    ("北京市朝阳", addr("北京市", "北京市", "朝阳区", "", "110105")),
    ("北京市朝阳路1号", addr("北京市", "北京市", "", "朝阳路1号", "110000")),
    ("北京 建国路88号", addr("北京市", "北京市", "", "建国路88号", "110000")),
    ("上海市朝阳区", "!朝阳区 is not a district of 上海市"),
    ("上海市朝阳区建国路88号", "!朝阳区 is not a district of 上海市"),
    ("北京建国路88号", "!an abbreviation (北京 for 北京市) is read only when"),
    ("襄樊市", "!NBS 2023"),
    ("吉林", "!ambiguous"),
]
for text, expected in SPECIAL:
    add("address", text, expected, "division" if not expected.startswith("!") else "")

# --- names: family | given | middle | order -----------------------------------------------
NAMES = [
    ("张|三||eastern", "张三"),
    ("欧阳|娜娜||eastern", "欧阳娜娜"),
    ("|欧阳娜娜||eastern", "欧阳娜娜"),
    ("欧阳娜娜|||eastern", "欧阳娜娜"),
    ("|司马光||eastern", "司马光"),
    ("诸葛|亮||eastern", "诸葛亮"),
    ("|诸葛亮||eastern", "诸葛亮"),
    ("上官|婉儿||eastern", "上官婉儿"),
    ("张|张三||eastern", "张三"),
    ("欧阳|欧阳娜娜||eastern", "欧阳娜娜"),
    ("|阿依古丽·买买提||eastern", "阿依古丽·买买提"),
    ("阿依古丽·买买提|||eastern", "阿依古丽·买买提"),
    ("买买提|阿依古丽·||eastern", "阿依古丽·买买提"),
    ("|阿依古丽・买买提||eastern", "阿依古丽·买买提"),
    ("|阿依古丽•买买提||eastern", "阿依古丽·买买提"),
    ("|努尔艾力·阿不都热依木||eastern", "努尔艾力·阿不都热依木"),
    ("|买买提||eastern", "买买提"),
    ("|才让||eastern", "才让"),
    ("|Madonna||western", "Madonna"),
    (" 张 |\u3000三\u3000||eastern", "张三"),
    ("|张 三||eastern", "张三"),
    ("Ｓｍｉｔｈ|Ｊｏｈｎ||western", "John Smith"),
    ("|Ｊｏｈｎ Ｓｍｉｔｈ||western", "John Smith"),
    ("|Smith, John||western", "John Smith"),
    ("|Dr. Martin Luther King Jr.||western", "Martin Luther King Jr."),
    ("|Juan Q. Xavier de la Vega III||western", "Juan Q. Xavier de la Vega III"),
    ("|Ludwig van Beethoven||western", "Ludwig van Beethoven"),
    ("van der Berg|Anna||western", "Anna van der Berg"),
    ("Kennedy|John|Fitzgerald|western", "John Fitzgerald Kennedy"),
    ("Nguyen|An|Van|eastern", "Nguyen Van An"),
    ("金|智秀||eastern", "金智秀"),
    ("김|민준||eastern", "김민준"),
    ("|Mr. John Smith||western", "John Smith"),
    ("|John Smith Jr.||western", "John Smith Jr."),
    ("司马|光|君|eastern", "司马君光"),
    ("|||eastern", "!empty"),
    ("  |\u3000||eastern", "!empty"),
    ("张|三||southern", "!eastern or western"),
    ("|ＺＨＡＮＧ Ｓａｎ||western", "ZHANG San"),
]
for value, expected in NAMES:
    add("name", value, expected, "")

# --- quantities ------------------------------------------------------------------------------
QUANTITIES = [
    ("10台", "10 UNIT"),
    ("十台", "10 UNIT"),
    ("十 台", "10 UNIT"),
    ("一百二十个", "120 PCE"),
    ("两箱", "2 BOX"),
    ("二十五件", "25 PCE"),
    ("三套", "3 SET"),
    ("壹拾件", "10 PCE"),
    ("廿台", "20 UNIT"),
    ("三万五个", "35000 PCE"),
    ("十点五公斤", "10.5 KGM"),
    ("零点五吨", "0.5 TNE"),
    ("１０台", "10 UNIT"),
    ("1,000台", "1000 UNIT"),
    (" 3 箱 ", "3 BOX"),
    ("2.5kg", "2.5 KGM"),
    ("2.5KG", "2.5 KGM"),
    ("0.125 千克", "0.125 KGM"),
    ("3吨", "3 TNE"),
    ("1.5米", "1.5 MTR"),
    ("10臺", "10 UNIT"),
    ("5個", "5 PCE"),
    ("2噸", "2 TNE"),
    ("10.0台", "10.0 UNIT"),
    ("10.5台", "!whole units"),
    ("1.5个", "!whole units"),
    ("2.5箱", "!whole units"),
    ("0.5套", "!whole units"),
    ("十点五台", "!whole units"),
    ("0台", "!greater than zero"),
    ("零台", "!greater than zero"),
    ("-3箱", "!greater than zero"),
    ("1.2345kg", "!more than three decimal places"),
    ("10", "!no unit"),
    ("十", "!no unit"),
    ("台", "!does not start with a number"),
    ("", "!does not start with a number"),
    ("1.2.3台", "!not a valid number"),
    ("10桶", "!unknown unit"),
    ("100000000000台", "!too large"),
]
for value, expected in QUANTITIES:
    add("quantity", value, expected, "")

# --- vocabulary: statuses (traditional too), units, genders, order numbers -------------------
for value, expected in [
    ("已发货", "SHIPPED"),
    ("已發貨", "SHIPPED"),
    ("待付款", "PENDING_PAYMENT"),
    ("待付款 ", "PENDING_PAYMENT"),
    ("已付款", "PAID"),
    ("已完成", "COMPLETED"),
    ("已取消", "CANCELLED"),
    ("已退款", "!unknown order status"),
]:
    add("status", value, expected, "")
for value, expected in [
    ("男", "M"),
    ("女", "F"),
    ("先生", "M"),
    ("女士", "F"),
    ("小姐", "F"),
    ("保密", "U"),
    ("未知", "U"),
    ("", "U"),
    ("male", "M"),
    ("Female", "F"),
    ("中性", "!not a gender word"),
]:
    add("gender", value, expected, "")
for value, expected in [
    ("ＳＯ－２０２４－０００１", "SO-2024-0001"),
    (" SO-2024-0002 ", "SO-2024-0002"),
    ("ＰＯ１２３", "PO123"),
    ("", "!empty"),
]:
    add("order_no", value, expected, "")

with open(HERE / "format_golden.csv", "w", encoding="utf-8", newline="") as fh:
    out = csv.writer(fh, lineterminator="\n")
    out.writerow(["category", "input", "expected", "check"])
    out.writerows(rows)
print(len(rows), "rows")
