"""`ringserve bench recall`: how well a retained context answers, per KV format — RULER-style tasks.

    ringserve bench recall [--address A --api-key K | --local] --lengths 1024,2048 --depths 0.1,0.5,0.9
        --formats exact,fp8,int4,keep:0.3 --tasks niah_single,niah_multikey,... --samples N --out DIR

The six tasks of NVIDIA's RULER that need no downloaded data, generated here (seeded, deterministic):

    niah_single      one needle "One of the special magic numbers for {key} is: {value}." in a haystack
                     of repeated filler ("The grass is green. The sky is blue. ...")
    niah_multikey    the needle among other needles of other keys (a needle haystack)
    niah_multivalue  four needles of one key; the question asks for all four values
    niah_multiquery  four needles of four keys; each key is asked in its own question
    vt               variable tracking: VAR X1 = 12345, VAR X2 = VAR X1, ... (four hops) in the filler;
                     the question asks for every variable holding the value
    cwe              common-words extraction: a numbered list where ten words are frequent; the question
                     asks for the ten most common

One session per context, several questions per session where the task has them (the retained-context
use): the context is created once, each question is a Generate that is not retained. Scoring is
RULER's: case-insensitive substring match, the fraction of the references found in the answer.

Against a running server (`--address`, `--api-key`, through the SDK) or an in-process engine
(`--local`, the same tokenization as the Gateway: the context is one user turn, each question the next
user turn with the generation prompt). Writes DIR/recall.json (one record per task x length x depth x
format: accuracy, bytes_ratio), a heatmap of needle depth x context length per format and a plot of
accuracy against the bytes ratio.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic numbers for {key} is: {value}."
ADJECTIVES = ("ancient", "bright", "calm", "dusty", "eager", "frozen", "gentle", "hollow", "icy", "jolly", "lucky",
              "misty", "noble", "quiet", "rapid", "silent", "tender", "vivid", "wild", "young")
NOUNS = ("river", "forest", "harbor", "lantern", "meadow", "orchard", "pebble", "quartz", "saddle", "tunnel",
         "valley", "window", "anchor", "beacon", "canyon", "dolphin", "engine", "falcon", "garden", "island")
WORDS = ("apple", "brick", "cloud", "drum", "eagle", "flute", "grape", "honey", "ivory", "jelly", "kite", "lemon",
         "mango", "nest", "olive", "piano", "quilt", "robin", "salt", "tiger", "umbra", "violet", "whale", "yacht",
         "zebra", "amber", "basil", "cedar", "daisy", "ember", "fern", "ginger", "hazel", "iris", "jade", "kelp",
         "lilac", "maple", "nutmeg", "onyx", "pearl", "quince", "rose", "sage", "thyme", "tulip", "willow", "yarrow")
ANSWER_TOKENS = {"cwe": 48, "vt": 40, "niah_multivalue": 48}


@dataclass(frozen=True)
class Question:
    text: str
    references: tuple[str, ...]
    max_tokens: int = 24


@dataclass(frozen=True)
class Sample:
    task: str
    length: int  # target context length in tokens (as the model's tokenizer counts them)
    depth: float  # where the needles sit, 0 = start, 1 = end (cwe: unused)
    index: int
    context: str
    questions: tuple[Question, ...]


def score(answer: str, references) -> float:
    """RULER's string match: the fraction of references found in the answer, case-insensitive."""
    a = answer.lower()
    return sum(1 for r in references if r.lower() in a) / len(references)


def _key(rng: random.Random, used: set) -> str:
    while True:
        k = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if k not in used:
            used.add(k)
            return k


def _value(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))  # 7 digits


def _fill(count: Callable[[str], int], length: int, pieces: list[str], depth: float, sentence: Callable[[int], str]
          ) -> str:
    """A haystack of `sentence(i)` lines, `pieces` (the needles) placed at `depth`, close to `length` tokens."""
    body = []
    budget = length - sum(count(" " + p) for p in pieces) - 24  # the chat template's tokens around it
    i = 0
    used = 0
    while True:
        s = sentence(i)
        n = count(" " + s)
        if used + n > budget:
            break
        body.append(s)
        used += n
        i += 1
    at = round(depth * len(body))
    for j, p in enumerate(pieces):  # consecutive needles a few sentences apart
        body.insert(min(len(body), at + 3 * j), p)
    return " ".join(body)


def make_sample(task: str, length: int, depth: float, index: int, count: Callable[[str], int], seed: int = 0) -> Sample:
    """One context of `task` and its questions; `count(text)` counts tokens with the served model's tokenizer."""
    rng = random.Random(f"{seed}:{task}:{length}:{depth}:{index}")
    used: set = set()
    filler = lambda i: FILLER  # noqa: E731
    if task == "niah_single":
        key, value = _key(rng, used), _value(rng)
        ctx = _fill(count, length, [NEEDLE.format(key=key, value=value)], depth, filler)
        qs = [Question(f"What is the special magic number for {key} mentioned in the provided text? Answer with "
                       "the number only.", (value,))]
    elif task == "niah_multikey":
        key, value = _key(rng, used), _value(rng)
        others = [NEEDLE.format(key=_key(rng, used), value=_value(rng)) for _ in range(length // 40)]
        ctx = _fill(count, length, [NEEDLE.format(key=key, value=value)], depth, lambda i: others[i % len(others)])
        qs = [Question(f"What is the special magic number for {key} mentioned in the provided text? Answer with "
                       "the number only.", (value,))]
    elif task == "niah_multivalue":
        key = _key(rng, used)
        values = [_value(rng) for _ in range(4)]
        ctx = _fill(count, length, [NEEDLE.format(key=key, value=v) for v in values], depth, filler)
        qs = [Question(f"What are all the special magic numbers for {key} mentioned in the provided text? "
                       "Answer with the numbers only, separated by commas.", tuple(values), ANSWER_TOKENS[task])]
    elif task == "niah_multiquery":
        pairs = [(_key(rng, used), _value(rng)) for _ in range(4)]
        ctx = _fill(count, length, [NEEDLE.format(key=k, value=v) for k, v in pairs], depth, filler)
        qs = [Question(f"What is the special magic number for {k} mentioned in the provided text? Answer with "
                       "the number only.", (v,)) for k, v in pairs]
    elif task == "vt":
        value = str(rng.randint(10_000, 99_999))
        names = ["".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(5)) for _ in range(5)]
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, 5)]
        ctx = _fill(count, length, chain, depth, filler)
        qs = [Question(f"Find all variables that are assigned the value {value} in the text above, directly or "
                       "through other variables. Answer with the variable names only, separated by commas.",
                       tuple(names), ANSWER_TOKENS[task])]
    elif task == "cwe":
        common = rng.sample(WORDS, 10)
        rare = [w for w in WORDS if w not in common]
        words: list[str] = []
        while True:  # rounds of every common word 3 times and 3 rare ones, while they fit
            batch = [w for w in common for _ in range(3)] + rng.sample(rare, 3)
            rng.shuffle(batch)
            if words and count(" ".join(f"{i + 1}. {w}" for i, w in enumerate(words + batch))) > length - 40:
                break
            words += batch
        ctx = "Below is a numbered list of words.\n" + "\n".join(f"{i + 1}. {w}" for i, w in enumerate(words))
        qs = [Question("What are the 10 most common words in the list above? Answer with the words only, "
                       "separated by commas.", tuple(common), ANSWER_TOKENS[task])]
    else:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    return Sample(task, length, depth, index, ctx, tuple(qs))


# ------------------------------------------------------------------------------------------ running


@dataclass
class Answer:
    sample: Sample
    question: Question
    format: str
    text: str
    score: float
    kv_bytes: int = 0  # its stored tokens' bytes in the session's format, scales included (0: not known)
    exact_bytes: int = 0  # what its tokens take in the model's dtype


@dataclass
class Record:
    task: str
    length: int
    depth: float
    format: str
    accuracy: float
    bytes_ratio: float
    samples: int
    questions: int
    scores: list[float] = field(default_factory=list)


class RemoteRunner:
    """Through the SDK against a running server."""

    def __init__(self, address: str, api_key: str | None, *, timeout: float = 600.0):
        from ringserve.client import Client

        self.client = Client(address, api_key=api_key, timeout=timeout)

    def run(self, sample: Sample, fmt: str) -> list[Answer]:
        s = self.client.create_session(sample.context, ttl="10m", kv_format=fmt)
        try:
            s.refresh()
            out = []
            for q in sample.questions:
                text = s.generate(q.text, max_tokens=q.max_tokens).text()
                out.append(Answer(sample, q, fmt, text, score(text, q.references), s.stored_kv_bytes,
                                  s.exact_kv_bytes))
            return out
        finally:
            s.delete()

    def close(self) -> None:
        self.client.close()


class LocalRunner:
    """An in-process engine (P = 1) over the given model, tokenizing as the Gateway does."""

    def __init__(self, model: str = "default"):
        from ringserve.workers.engine import ShardEngine
        from ringserve.workers.loader import load_model

        self.loaded = load_model(model)
        self.tok = self.loaded.tokenizer
        self.engine = ShardEngine(self.loaded)
        self._n = 0

    def prompt_ids(self, sample: Sample, q: Question) -> tuple[list[int], list[int]]:
        """The context's and the question's token ids, exactly as the Gateway makes them from text."""
        ctx = self.tok.encode_chat([{"role": "user", "content": sample.context}], add_generation_prompt=False)
        return ctx, self.tok.encode_turn([{"role": "user", "content": q.text}], add_generation_prompt=True)

    def run(self, sample: Sample, fmt: str) -> list[Answer]:
        from ringserve.workers.protocol import KVFormat, SamplingParams

        spec = KVFormat.parse(fmt)
        self._n += 1
        sid = f"recall{self._n}"
        ctx, _ = self.prompt_ids(sample, sample.questions[0])
        # as the Gateway asks: fp8/int4 are written packed from the first chunk; keep thins the prefilled
        # context at the end of its create (workers/executor.py)
        self.engine.prefill(sid, ctx, kv_format=spec.name, keep_fraction=spec.keep_fraction)
        try:
            g = self.engine.store.geometry
            nbytes, exact = self.engine.store.stored_bytes(sid), len(ctx) * g.token_bytes
            out = []
            for q in sample.questions:
                _, qids = self.prompt_ids(sample, q)
                ids = list(self.engine.generate(sid, qids, SamplingParams(max_tokens=q.max_tokens)))
                text = self.tok.decode(ids)
                out.append(Answer(sample, q, fmt, text, score(text, q.references), nbytes, exact))
            return out
        finally:
            self.engine.drop(sid)

    def close(self) -> None:
        pass


def counter(model: str = "default") -> Callable[[str], int]:
    from ringserve.workers.loader import load_tokenizer

    tok = load_tokenizer(model)
    return lambda text: len(tok.encode(text))


def run_recall(runner, *, tasks, lengths, depths, formats, samples: int, count: Callable[[str], int], seed: int = 0,
               progress: bool = True) -> tuple[list[Record], list[Answer]]:
    """Every task x length x depth x format x sample through `runner`; records and every answer."""
    plan = [(t, n, d, f, i) for t in tasks for n in lengths for d in (depths if t != "cwe" else [0.5])
            for f in formats for i in range(samples)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(plan), desc="recall", unit="ctx", file=sys.stderr)
    answers: list[Answer] = []
    cache: dict = {}
    for t, n, d, f, i in plan:
        key = (t, n, d, i)
        if key not in cache:
            cache[key] = make_sample(t, n, d, i, count, seed)
        answers += runner.run(cache[key], f)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    records: dict = {}
    for a in answers:
        s, f = a.sample, a.format
        r = records.setdefault((s.task, s.length, s.depth, f), Record(s.task, s.length, s.depth, f, 0.0, 1.0, 0, 0))
        r.scores.append(a.score)
        r.questions += 1
        r.bytes_ratio = (a.kv_bytes / a.exact_bytes) if a.exact_bytes else 1.0
    for (t, n, d, f), r in records.items():
        r.samples = samples
        r.accuracy = sum(r.scores) / len(r.scores)
    return list(records.values()), answers


# ------------------------------------------------------------------------------------------ reporting


def table(records: list[Record]) -> str:
    """Task x length x format: accuracy (over depths and samples) and bytes ratio."""
    rows = {}
    for r in records:
        acc = rows.setdefault((r.task, r.length, r.format), [[], r.bytes_ratio])
        acc[0] += r.scores
    lines = ["| task | length | format | accuracy | kv bytes ratio | questions |", "|---|---:|---|---:|---:|---:|"]
    for (t, n, f), (scores, ratio) in sorted(rows.items()):
        lines.append(f"| {t} | {n} | {f} | {100 * sum(scores) / len(scores):.1f} | {ratio:.2f} | {len(scores)} |")
    return "\n".join(lines)


def write(out: Path, records: list[Record], config: dict, answers: list[Answer] = ()) -> list[Path]:
    """recall.json, answers.jsonl (every question's answer and score, to read what the model said) and
    the pictures; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    files = [out / "recall.json", out / "answers.jsonl"]
    files[0].write_text(json.dumps({"config": config, "records": [
        {k: v for k, v in asdict(r).items() if k != "scores"} for r in records]}, indent=1))
    files[1].write_text("".join(json.dumps({
        "task": a.sample.task, "length": a.sample.length, "depth": a.sample.depth, "sample": a.sample.index,
        "format": a.format, "question": a.question.text, "references": list(a.question.references),
        "answer": a.text, "score": a.score, "kv_bytes": a.kv_bytes, "exact_bytes": a.exact_bytes}) + "\n"
        for a in answers))
    formats = sorted({r.format for r in records})
    lengths = sorted({r.length for r in records})
    depths = sorted({r.depth for r in records if r.task != "cwe"}) or [0.5]
    for f in formats:  # heatmap: needle depth x context length, accuracy over the needle tasks
        grid = [[_mean([s for r in records if r.format == f and r.task != "cwe" and r.length == n and r.depth == d
                        for s in r.scores]) for n in lengths] for d in depths]
        fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(lengths), 1.2 + 0.6 * len(depths)))
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"recall, KV format {f}")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, "-" if v != v else f"{100 * v:.0f}", ha="center", va="center", fontsize=8)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        p = out / f"recall_heatmap_{f.replace(':', '_')}.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        files.append(p)
    fig, ax = plt.subplots(figsize=(5, 3.5))  # accuracy vs bytes ratio, one point per format and length
    for n in lengths:
        pts = sorted((_mean([r.bytes_ratio for r in records if r.format == f and r.length == n]),
                      _mean([s for r in records if r.format == f and r.length == n for s in r.scores]), f)
                     for f in formats)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{n} tokens")
        for x, y, f in pts:
            ax.annotate(f, (x, y), fontsize=7)
    ax.set_xlabel("stored KV bytes / exact")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    fig.tight_layout()
    p = out / "recall_vs_bytes.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    files.append(p)
    return files


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


# ------------------------------------------------------------------------------------------ the command


def add_parser(sub) -> None:
    p = sub.add_parser("recall", help="RULER-style recall of retained contexts, per KV format")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--address", default=None, help="a running server (default: $RINGSERVE_ADDRESS)")
    where.add_argument("--local", action="store_true", help="an in-process engine instead of a server")
    p.add_argument("--api-key", default=None, help="default: $RINGSERVE_API_KEY")
    p.add_argument("--model", default="default", help="the served model (tokenizer for lengths; --local: the model)")
    p.add_argument("--lengths", default="1024,2048")
    p.add_argument("--depths", default="0.1,0.5,0.9")
    p.add_argument("--formats", default="exact", help="comma-separated: exact, fp8, int4, keep:<fraction>")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="recall-out")
    p.set_defaults(func=cmd_recall)


def cmd_recall(args) -> int:
    import os

    tasks = [t for t in args.tasks.split(",") if t]
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise ValueError(f"unknown task(s) {bad}; tasks: {', '.join(TASKS)}")
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    from ringserve.workers.protocol import KVFormat

    formats = [str(KVFormat.parse(f)) for f in args.formats.split(",") if f]
    if args.local:
        runner = LocalRunner(args.model)
    else:
        address = args.address or os.environ.get("RINGSERVE_ADDRESS", "localhost:50051")
        runner = RemoteRunner(address, args.api_key or os.environ.get("RINGSERVE_API_KEY"))
    t0 = time.perf_counter()
    try:
        records, answers = run_recall(runner, tasks=tasks, lengths=lengths, depths=depths, formats=formats,
                                      samples=args.samples, count=counter(args.model), seed=args.seed)
    finally:
        runner.close()
    config = {"tasks": tasks, "lengths": lengths, "depths": depths, "formats": formats, "samples": args.samples,
              "seed": args.seed, "model": args.model, "where": "local" if args.local else "server",
              "seconds": round(time.perf_counter() - t0, 1)}
    print(table(records))
    for f in write(Path(args.out), records, config, answers):
        print(f"wrote {f}")
    return 0
