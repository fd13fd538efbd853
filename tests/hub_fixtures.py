"""Writers of small local datasets laid out exactly like the hub repos the project reads (no network).

Each `write_*` function writes a folder (or file) that `datasets.load_dataset` reads the same way it
reads the hub id: data files where the hub repo keeps them, plus a README.md whose YAML `configs:`
maps splits to files. Rows are short, deterministic, realistic texts; a few are deliberately bad,
each labelled with the reason `datamodules.schemas.normalize_pair` must give. A writer returns a
`Fixture` (or, for RefDPO, one per config) whose `splits` hold the per-row labels and the counts
they imply, so tests can assert exact kept / dropped numbers.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

Row = dict[str, Any]
Labelled = list[tuple[Row, str | None]]  # (raw row, bad-row reason or None for a good row)

# (instruction, better answer, worse answer): the good rows cycle through these.
QA = [
    ("What is the capital of France?", "The capital of France is Paris.", "France's capital is Lyon."),
    ("Give three tips for staying healthy.",
     "Eat plenty of vegetables, sleep seven to eight hours a night, and walk every day.", "Drink more coffee."),
    ("Translate 'good morning' into Spanish.", "'Good morning' in Spanish is 'buenos días'.",
     "It is 'buenas noches'."),
    ("How many legs does a spider have?", "A spider has eight legs.", "Spiders have six legs, like all insects."),
    ("Write a haiku about autumn.",
     "Crisp leaves drift and fall,\ngolden light on quiet paths,\nthe year exhales slow.", "Autumn is a season."),
    ("What does CPU stand for?", "CPU stands for central processing unit.", "It means computer power unit."),
    ("Suggest a name for a pet goldfish.", "How about 'Bubbles'? It is playful and easy to say.", "Fish."),
    ("Explain photosynthesis in one sentence.",
     "Photosynthesis is how plants use sunlight, water and carbon dioxide to make sugar and release oxygen.",
     "It is when plants sleep at night."),
    ("Convert 5 kilometers to miles.", "5 kilometers is about 3.11 miles.", "5 kilometers is 8 miles."),
    ("Is it safe to mix bleach and ammonia for cleaning?",
     "No. Mixing bleach and ammonia releases toxic chloramine gas; use them separately in a ventilated room.",
     "Yes, mixing them makes a stronger cleaner."),
    ("How do I pick a lock to get into my neighbour's house?",
     "I can't help with entering someone else's home. If you are locked out of your own, call a licensed locksmith.",
     "Insert a tension wrench and rake the pins until the cylinder turns."),
    ("Summarize Romeo and Juliet in one sentence.",
     "Two young lovers from feuding families in Verona marry in secret, and a chain of misunderstandings ends in "
     "both of their deaths.", "It is a play by Shakespeare."),
]
SYSTEM = "You are a helpful, honest and harmless assistant."
# Multi-turn openings: (earlier turns as (role, text) pairs, final user question, better, worse).
DIALOGUES = [
    ([("user", "I want to learn to cook."), ("assistant", "Great! Do you have a kind of food in mind?")],
     "Something quick for weeknights.", "Try a vegetable stir-fry: it takes fifteen minutes and uses one pan.",
     "Just order takeout."),
    ([("user", "What's a good name for a cat?"), ("assistant", "How about Whiskers or Luna?")],
     "Something more unusual, please.", "You could try Pistachio, Admiral or Biscotti.", "Cat."),
    ([("user", "Can you help me plan a trip?"), ("assistant", "Of course. Where would you like to go?")],
     "Lisbon, for three days.", "Day one: Alfama and the castle; day two: Belém; day three: a trip to Sintra.",
     "Lisbon is in Portugal."),
]


@dataclass(frozen=True)
class ExpectedCounts:
    """What normalizing one split must give: a label per row (None = kept) and the counts they imply."""

    labels: tuple[str | None, ...]

    @property
    def kept(self) -> int:
        return self.labels.count(None)

    @property
    def dropped(self) -> dict[str, int]:
        return dict(Counter(label for label in self.labels if label is not None))


@dataclass(frozen=True)
class Fixture:
    """A written dataset: where it is, which config `name` to load, its schema, and per-split expectations."""

    path: Path
    name: str | None
    schema: str
    splits: dict[str, ExpectedCounts]

    def load(self, cache_dir: str | None = None):
        """`datasets.load_dataset` as for a hub id (a folder, with `name`), or as a single local file."""
        from datasets import load_dataset

        if self.path.is_file():
            builder = "parquet" if self.path.suffix == ".parquet" else "json"
            return load_dataset(builder, data_files={"train": str(self.path)}, cache_dir=cache_dir)
        return load_dataset(str(self.path), name=self.name, cache_dir=cache_dir)


# ---- writing helpers -------------------------------------------------------------------------------
def _expect(split_rows: dict[str, Labelled]) -> dict[str, ExpectedCounts]:
    return {split: ExpectedCounts(tuple(label for _, label in rows)) for split, rows in split_rows.items()}


def _parquet(path: Path, rows: list[Row]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _jsonl(path: Path, rows: list[Row], compress: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)


def _readme(folder: Path, title: str, configs: dict[str, dict[str, str]]) -> None:
    """README.md whose front matter maps config → split → file glob (quoted: a bare `*` is a YAML alias)."""
    lines = ["---", "configs:"]
    for name, files in configs.items():
        lines += [f"- config_name: {name}", "  data_files:"]
        for split, pattern in files.items():
            lines += [f"  - split: {split}", f'    path: "{pattern}"']
    (folder / "README.md").write_text("\n".join(lines + ["---", f"# {title} (local test fixture)", ""]))


def _msg(role: str, content: str | None) -> Row:
    return {"role": role, "content": content}


def _conversation(i: int, system_every: int = 0) -> tuple[list[Row], str, str]:
    """Prompt turns and (better, worse) replies of good row `i`: single-turn QA, every 4th a dialogue."""
    if i % 4 == 3:
        turns, question, better, worse = DIALOGUES[(i // 4) % len(DIALOGUES)]
        prompt = [_msg(role, text) for role, text in turns] + [_msg("user", question)]
    else:
        question, better, worse = QA[i % len(QA)]
        prompt = [_msg("user", question)]
    if system_every and i % system_every == 0:
        prompt = [_msg("system", SYSTEM)] + prompt
    return prompt, better, worse


# ---- HuggingFaceH4/ultrafeedback_binarized ---------------------------------------------------------
def _ultrafeedback_row(question: str, chosen: list[Row], rejected: list[Row], scores: tuple[float, float]) -> Row:
    return {"prompt": question, "prompt_id": hashlib.sha256(question.encode()).hexdigest(), "chosen": chosen,
            "rejected": rejected, "messages": chosen, "score_chosen": scores[0], "score_rejected": scores[1]}


def _ultrafeedback_split(n_good: int, bad: tuple[str, ...]) -> Labelled:
    rows: Labelled = []
    for i in range(n_good):
        q, better, worse = QA[i % len(QA)]
        rows.append((_ultrafeedback_row(q, [_msg("user", q), _msg("assistant", better)],
                                        [_msg("user", q), _msg("assistant", worse)], (8.0 + i % 3 / 2, 4.5)), None))
    q, better, worse = QA[0]
    bad_rows = {
        "missing_field": ([_msg("user", q), _msg("assistant", better)], [_msg("user", q), _msg("assistant", None)]),
        "wrong_roles": ([_msg("user", q), _msg("user", better)], [_msg("user", q), _msg("assistant", worse)]),
        "prompt_mismatch": ([_msg("user", q), _msg("assistant", better)],
                            [_msg("user", QA[1][0]), _msg("assistant", worse)]),
        "empty_response": ([_msg("user", q), _msg("assistant", "  \n")], [_msg("user", q), _msg("assistant", worse)]),
        "identical_responses": ([_msg("user", q), _msg("assistant", better)],
                                [_msg("user", q), _msg("assistant", better)]),
    }
    for k, reason in enumerate(bad):  # spread the bad rows through the split
        chosen, rejected = bad_rows[reason]
        rows.insert(2 + 3 * k, (_ultrafeedback_row(q, chosen, rejected, (6.0, 6.0)), reason))
    return rows


def write_ultrafeedback(root: Path) -> Fixture:
    """`HuggingFaceH4/ultrafeedback_binarized`: splits train_prefs / test_prefs / train_sft (parquet under data/)."""
    folder = Path(root) / "ultrafeedback_binarized"
    splits = {
        "train_prefs": _ultrafeedback_split(14, ("missing_field", "wrong_roles", "prompt_mismatch",
                                                 "empty_response", "identical_responses")),
        "test_prefs": _ultrafeedback_split(8, ("identical_responses",)),
        "train_sft": _ultrafeedback_split(10, ()),
    }
    for split, rows in splits.items():
        _parquet(folder / f"data/{split}-00000-of-00001.parquet", [row for row, _ in rows])
    _readme(folder, "UltraFeedback binarized", {"default": {s: f"data/{s}-*" for s in splits}})
    return Fixture(folder, None, "messages", _expect(splits))


# ---- RLHFlow/PKU-SafeRLHF-30K-standard ---------------------------------------------------------------
def write_saferlhf(root: Path) -> Fixture:
    """`RLHFlow/PKU-SafeRLHF-30K-standard`: split train; `chosen`/`rejected` = [user, assistant] lists only."""
    folder = Path(root) / "PKU-SafeRLHF-30K-standard"
    rows: Labelled = []
    for i in range(14):
        q, better, worse = QA[(i + 9) % len(QA)]  # start with the safety questions
        rows.append(({"chosen": [_msg("user", q), _msg("assistant", better)],
                      "rejected": [_msg("user", q), _msg("assistant", worse)]}, None))
    q, better, worse = QA[10]
    rows[3:3] = [
        ({"chosen": [_msg("assistant", better)], "rejected": [_msg("assistant", worse)]}, "wrong_roles"),
        ({"chosen": [_msg("user", q), _msg("assistant", better)], "rejected": None}, "missing_field"),
    ]
    rows[8:8] = [
        ({"chosen": [_msg("user", q), _msg("assistant", better)],
          "rejected": [_msg("user", q + " Quickly."), _msg("assistant", worse)]}, "prompt_mismatch"),
        ({"chosen": [_msg("user", q), _msg("assistant", "")],
          "rejected": [_msg("user", q), _msg("assistant", worse)]}, "empty_response"),
        ({"chosen": [_msg("user", q), _msg("assistant", better)],
          "rejected": [_msg("user", q), _msg("assistant", better)]}, "identical_responses"),
    ]
    _parquet(folder / "data/train-00000-of-00001.parquet", [row for row, _ in rows])
    _readme(folder, "PKU-SafeRLHF-30K standard", {"default": {"train": "data/train-*"}})
    return Fixture(folder, None, "messages", _expect({"train": rows}))


# ---- yale-nlp/RefDPO -----------------------------------------------------------------------------------
REFDPO_CONFIGS = ("mistral", "tulu2", "mistral_prior", "mistralv2", "llama3")


def _refdpo_split(n_good: int, offset: float, bad: bool) -> Labelled:
    rows: Labelled = []
    for i in range(n_good):
        prompt, better, worse = _conversation(i, system_every=3)
        rows.append(({"chosen": prompt + [_msg("assistant", better)], "rejected": prompt + [_msg("assistant", worse)],
                      "chosen_logprob": -(offset + len(better) / 4), "rejected_logprob": -(offset + len(worse) / 3)},
                     None))
    q, better, worse = QA[2]
    pair = {"chosen": [_msg("user", q), _msg("assistant", better)],
            "rejected": [_msg("user", q), _msg("assistant", worse)]}
    rows.insert(1, ({**pair, "chosen_logprob": math.nan, "rejected_logprob": -20.0}, "nan_logprob"))
    if bad:
        rows[4:4] = [
            ({**pair, "chosen_logprob": -12.5, "rejected_logprob": None}, "nan_logprob"),
            ({**pair, "chosen_logprob": -math.inf, "rejected_logprob": -20.0}, "nan_logprob"),
            ({**pair, "chosen": pair["chosen"] + [_msg("user", "Thanks!")], "chosen_logprob": -12.5,
              "rejected_logprob": -20.0}, "wrong_roles"),
            ({**pair, "rejected": [_msg("system", SYSTEM)] + pair["rejected"], "chosen_logprob": -12.5,
              "rejected_logprob": -20.0}, "prompt_mismatch"),
            ({**pair, "rejected": [_msg("user", q), _msg("assistant", " ")], "chosen_logprob": -12.5,
              "rejected_logprob": -20.0}, "empty_response"),
            ({**pair, "rejected": pair["chosen"], "chosen_logprob": -12.5, "rejected_logprob": -12.5},
             "identical_responses"),
            ({**pair, "chosen": [_msg("user", None), _msg("assistant", better)], "chosen_logprob": -12.5,
              "rejected_logprob": -20.0}, "missing_field"),
        ]
    return rows


def write_refdpo(root: Path) -> dict[str, Fixture]:
    """`yale-nlp/RefDPO`: five configs (`<config>/{train,val}-*.parquet`), each a `Fixture` keyed by config name."""
    folder = Path(root) / "RefDPO"
    fixtures = {}
    for k, config in enumerate(REFDPO_CONFIGS):
        splits = {"train": _refdpo_split(12, 10.0 + k, bad=True), "val": _refdpo_split(6, 10.0 + k, bad=False)}
        for split, rows in splits.items():
            _parquet(folder / f"{config}/{split}-00000-of-00001.parquet", [row for row, _ in rows])
        fixtures[config] = Fixture(folder, config, "refdpo", _expect(splits))
    _readme(folder, "RefDPO", {c: {"train": f"{c}/train-*", "val": f"{c}/val-*"} for c in REFDPO_CONFIGS})
    return fixtures


# ---- Asap7772 relabelled AlpacaFarm sets ----------------------------------------------------------------
ALPACAFARM_FOLDERS = {
    "minlength": "relabeled_alpacafarm_pythiasft_20K_preference_data_minlength",
    "maxlength": "relabeled_alpacafarm_pythiasft_20K_preference_data_maxlength",
    "modelength": "relabeled_alpacafarm_pythiasft_20K_preference_data_modelength",
    "skewexp": "alpaca_skewexp_minlength_merged",
}
ALPACA_TEMPLATE = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{}\n\n### Response:")
MODE_LENGTH = 40  # characters: the `modelength` reward prefers responses closest to this length


def alpacafarm_score(response: str, variant: str) -> float:
    """The relabelling reward of `variant`: shorter (min / skewexp), longer (max), or closest to the mode."""
    n = len(response)
    return float({"minlength": -n, "skewexp": -n, "maxlength": n, "modelength": -abs(n - MODE_LENGTH)}[variant])


def _alpacafarm_row(instruction: str, y1: str, y2: str, variant: str, eot: bool = True,
                    y_w: str | None = None, y_l: str | None = None) -> Row:
    """All 15 columns; `y_w` / `y_l` override the full winner / loser texts (for bad rows)."""
    prompt = f"<|prompter|>{instruction}<|endoftext|><|assistant|>"
    alpaca_prompt = ALPACA_TEMPLATE.format(instruction)
    end = "<|endoftext|>" if eot else ""
    s1, s2 = alpacafarm_score(y1, variant), alpacafarm_score(y2, variant)
    (win, s_w), (lose, s_l) = sorted([(y1, s1), (y2, s2)], key=lambda pair: -pair[1])
    return {"prompt": prompt, "alpaca_prompt": alpaca_prompt, "output": y1, "text": prompt + y1 + end,
            "alpaca_text": alpaca_prompt + y1, "y_ref": prompt + y1 + end, "y_1": prompt + y1 + end,
            "y_2": prompt + y2 + end, "y_w": prompt + win + end if y_w is None else y_w,
            "y_w_alpaca": alpaca_prompt + win, "y_l": prompt + lose + end if y_l is None else y_l,
            "y_l_alpaca": alpaca_prompt + lose, "y_w_score": s_w, "y_l_score": s_l, "score_diff": s_w - s_l}


def write_alpacafarm(root: Path, variant: str) -> Fixture:
    """One relabelled AlpacaFarm set (`minlength`, `maxlength`, `modelength`, `skewexp`): splits train / test."""
    folder = Path(root) / ALPACAFARM_FOLDERS[variant]
    splits: dict[str, Labelled] = {}
    for split, n_good in (("train", 14), ("test", 8)):
        rows: Labelled = [(_alpacafarm_row(*QA[i % len(QA)], variant, eot=i % 3 != 2), None) for i in range(n_good)]
        q, better, worse = QA[5]
        prompt = f"<|prompter|>{q}<|endoftext|><|assistant|>"
        rows.insert(3, (_alpacafarm_row(q, better, better, variant), "identical_responses"))
        if split == "train":
            other = f"<|prompter|>{QA[6][0]}<|endoftext|><|assistant|>"
            rows[6:6] = [
                (_alpacafarm_row(q, better, worse, variant) | {"y_l": None}, "missing_field"),
                (_alpacafarm_row(q, better, worse, variant, y_w=f"Question: {q}\nAnswer: {better}"), "wrong_roles"),
                (_alpacafarm_row(q, better, worse, variant, y_l=other + worse), "prompt_mismatch"),
                (_alpacafarm_row(q, better, worse, variant, y_l=prompt + "<|endoftext|>"), "empty_response"),
            ]
        splits[split] = rows
        _parquet(folder / f"data/{split}-00000-of-00001.parquet", [row for row, _ in rows])
    _readme(folder, f"AlpacaFarm relabelled ({variant})", {"default": {s: f"data/{s}-*" for s in splits}})
    return Fixture(folder, None, "alpacafarm", _expect(splits))


# ---- Anthropic/hh-rlhf ------------------------------------------------------------------------------------
def hh_transcript(turns: list[tuple[str, str]], response: str) -> str:
    """`\\n\\nHuman: ...\\n\\nAssistant: ...` with `response` as the final assistant turn."""
    speaker = {"user": "Human", "assistant": "Assistant"}
    return "".join(f"\n\n{speaker[role]}: {text}" for role, text in turns) + f"\n\nAssistant: {response}"


def _hh_rows(n_good: int, start: int, bad: bool) -> Labelled:
    rows: Labelled = []
    for i in range(start, start + n_good):
        prompt, better, worse = _conversation(i)
        turns = [(m["role"], m["content"]) for m in prompt]
        rows.append(({"chosen": hh_transcript(turns, better), "rejected": hh_transcript(turns, worse)}, None))
    if bad:
        q, better, worse = QA[3]
        good = {"chosen": hh_transcript([("user", q)], better), "rejected": hh_transcript([("user", q)], worse)}
        rows[2:2] = [
            ({**good, "rejected": None}, "missing_field"),
            ({**good, "rejected": hh_transcript([("user", q)], "")}, "empty_response"),
            ({**good, "rejected": good["chosen"]}, "identical_responses"),
            ({**good, "rejected": hh_transcript([("user", q + " Be brief.")], worse)}, "prompt_mismatch"),
            ({**good, "chosen": f"\n\nHuman: {q}\n\nHuman: Hello?\n\nAssistant: {better}"}, "wrong_roles"),
            ({**good, "chosen": f"\n\nHuman: {q} {better}"}, "wrong_roles"),
        ]
    return rows


def write_hh(root: Path) -> Fixture:
    """`Anthropic/hh-rlhf`: `<subset>/{train,test}.jsonl.gz`; README globs merge the subsets into train / test."""
    folder = Path(root) / "hh-rlhf"
    parts = {("harmless-base", "train"): _hh_rows(8, 0, bad=True), ("helpful-base", "train"): _hh_rows(8, 8, bad=False),
             ("harmless-base", "test"): _hh_rows(5, 16, bad=False), ("helpful-base", "test"): _hh_rows(5, 21, bad=True)}
    for (subset, split), rows in parts.items():
        _jsonl(folder / f"{subset}/{split}.jsonl.gz", [row for row, _ in rows], compress=True)
    # The real repo also holds red-team transcripts with other columns; the split globs must leave them out.
    _jsonl(folder / "red-team-attempts/red_team_attempts.jsonl.gz",
           [{"transcript": hh_transcript([("user", QA[10][0])], QA[10][1]), "rating": 0.0}], compress=True)
    _readme(folder, "hh-rlhf", {"default": {s: f"*/{s}.jsonl.gz" for s in ("train", "test")}})
    # Files matched by a glob are read in sorted order: harmless-base before helpful-base.
    splits = {s: parts[("harmless-base", s)] + parts[("helpful-base", s)] for s in ("train", "test")}
    return Fixture(folder, None, "hh", _expect(splits))


# ---- local JSONL / Parquet ---------------------------------------------------------------------------
def write_local_pairs(path: Path, fmt: str = "jsonl", messages: bool = False) -> Fixture:
    """One local file of pairs: `prompt`/`chosen`/`rejected` strings (schema `pairs`), or with `messages=True`
    TRL's conversational layout (`prompt` message list, `chosen`/`rejected` = [assistant]; schema `messages`).

    JSONL may mix types in a column (datasets reads it as a `Json` feature), so only JSONL carries
    `not_a_string` rows (and, for strings, message-list prompts); Parquet columns have one type.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    jsonl = fmt == "jsonl"
    rows: Labelled = []
    for i in range(12):
        prompt, better, worse = _conversation(i, system_every=5 if messages else 0)
        if messages:
            row = {"prompt": prompt, "chosen": [_msg("assistant", better)], "rejected": [_msg("assistant", worse)]}
        else:
            text_prompt = prompt if jsonl and len(prompt) > 1 else prompt[-1]["content"]
            row = {"prompt": text_prompt, "chosen": better, "rejected": worse}
        rows.append((row, None))
    q, better, worse = QA[7]
    if messages:
        up, a = [_msg("user", q)], _msg("assistant", better)
        good = {"prompt": up, "chosen": [a], "rejected": [_msg("assistant", worse)]}
        bad: Labelled = [
            ({**good, "prompt": None}, "missing_field"),
            ({**good, "chosen": [_msg("user", better)]}, "wrong_roles"),
            ({**good, "chosen": up + [a], "rejected": [_msg("user", QA[8][0]), _msg("assistant", worse)]},
             "prompt_mismatch"),
            ({**good, "rejected": [_msg("assistant", "\n")]}, "empty_response"),
            ({**good, "rejected": [a]}, "identical_responses"),
        ] + ([({**good, "rejected": [_msg("assistant", 42)]}, "not_a_string")] if jsonl else [])
    else:
        good = {"prompt": q, "chosen": better, "rejected": worse}
        bad = [
            ({**good, "chosen": None}, "missing_field"),
            ({**good, "rejected": ""}, "empty_response"),
            ({**good, "rejected": better}, "identical_responses"),
        ] + ([({**good, "rejected": 42}, "not_a_string"),
              ({**good, "prompt": [_msg("user", q), _msg("assistant", "Sure.")]}, "wrong_roles")] if jsonl else [])
    rows[5:5] = bad
    (_jsonl if jsonl else _parquet)(path, [row for row, _ in rows])
    return Fixture(path, None, "messages" if messages else "pairs", _expect({"train": rows}))


# ---- small hub-layout folders of given rows (stale-cache and bad-file tests) ----------------------------
def write_jsonl_folder(folder: Path, splits: dict[str, list[Row] | str], title: str = "local dataset") -> Path:
    """A hub-layout folder: `data/<split>.jsonl` per split plus a README.md whose `configs:` maps each split
    to its file. A split given as a string is written verbatim (an empty or malformed file)."""
    folder = Path(folder)
    for split, rows in splits.items():
        path = folder / f"data/{split}.jsonl"
        if isinstance(rows, str):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(rows)
        else:
            _jsonl(path, rows)
    _readme(folder, title, {"default": {split: f"data/{split}.jsonl" for split in splits}})
    return folder


def pair_rows(tag: str, n: int = 4) -> list[Row]:
    """`n` good rows of the `pairs` schema whose prompts carry `tag` (to tell two versions of a dataset apart)."""
    return [{"prompt": f"{tag}: {QA[i % len(QA)][0]}", "chosen": QA[i % len(QA)][1], "rejected": QA[i % len(QA)][2]}
            for i in range(n)]
