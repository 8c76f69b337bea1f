"""The `ringserve` command line.

    ringserve generate [--model default|DIR|FILE.gguf] [--file DOC] [--max-tokens N]
                       [--temperature T --top-p P --top-k K --seed S] [--max-context N] "question"

streams the answer to the terminal. A user error (missing model, empty or too-long prompt) prints
one line starting with "error:" and exits with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time


def _add_generate(sub):
    p = sub.add_parser("generate", help="generate an answer on this machine (single device)")
    p.add_argument("prompt", help="the question or instruction")
    p.add_argument("--model", default="default",
                   help="'default' (SmolLM2-135M-Instruct), a Hugging Face checkpoint folder, or a .gguf file")
    p.add_argument("--file", help="a text document given as context before the question")
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 (default) = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--max-context", type=int, default=None,
                   help="longest sequence accepted in tokens (default: the model's context length)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--stats", action="store_true", help="print prefill and decode speed to stderr")
    p.add_argument("--sp", type=int, default=1,
                   help="ranks of a sequence-parallel group on a local Ray (gloo on CPU, NCCL on GPUs); "
                        "1 (default) runs on one device without Ray")
    p.set_defaults(func=cmd_generate)


def build_messages(prompt: str, document: str | None) -> list[dict]:
    """The document and the question as one user message: the form SmolLM2 answers best (ANCHORS.md)."""
    content = f"{document}\n\n{prompt}" if document else prompt
    return [{"role": "user", "content": content}]


def cmd_generate(args) -> int:
    import torch

    from ringserve.workers.engine import Engine, GenerationStats
    from ringserve.workers.loader import load_model
    from ringserve.workers.sampling import SamplingParams

    doc = None
    if args.file:
        try:
            with open(args.file, encoding="utf-8") as f:
                doc = f.read()
        except OSError as e:
            raise UserError(f"cannot read --file {args.file}: {e.strerror}") from e
    if not args.prompt.strip() and not (doc or "").strip():
        raise UserError("the prompt is empty: give a question (and optionally --file)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            seed=args.seed, max_tokens=args.max_tokens)
    if args.sp < 1:
        raise UserError(f"--sp must be >= 1, got {args.sp}")
    loaded = load_model(args.model, device=device if args.sp == 1 else "cpu")
    tok = loaded.tokenizer
    ids = tok.encode(args.prompt) if args.raw else tok.encode_chat(build_messages(args.prompt, doc))
    stats = GenerationStats()
    stream = tok.stream()
    if args.sp == 1:
        tokens = Engine(loaded, max_context=args.max_context).generate(ids, params, stats=stats)
    else:
        tokens = _generate_on_group(args, ids, params, stats, gpu=device == "cuda")
    for t in tokens:
        sys.stdout.write(stream.push(t))
        sys.stdout.flush()
    sys.stdout.write(stream.flush() + "\n")
    if args.stats:
        pf = stats.prompt_tokens / max(stats.prefill_s, 1e-9)
        dc = stats.generated_tokens / max(stats.decode_s, 1e-9)
        print(f"prompt {stats.prompt_tokens} tok, prefill {pf:.0f} tok/s; generated {stats.generated_tokens} tok, "
              f"decode {dc:.1f} tok/s; stop: {stats.stop_reason}", file=sys.stderr)
    return 0


def _generate_on_group(args, ids, params, stats, *, gpu: bool):
    """The same request on a local WorkerGroup of args.sp ranks: the document is prefilled with ring
    attention, the last few tokens are sent as the question (pass-Q), then SP decode."""
    import time

    import ray

    from ringserve.workers.group import GroupConfig, WorkerGroup

    if len(ids) < 2:
        raise UserError("--sp needs a prompt of at least 2 tokens")
    if not ray.is_initialized():
        ray.init(num_cpus=max(2, args.sp), include_dashboard=False, log_to_driver=False)
    group = WorkerGroup(GroupConfig(sp=args.sp, model=args.model, max_context=args.max_context,
                                    num_cpus_per_rank=1.0 if gpu else max(0.25, 2 / args.sp),
                                    num_gpus_per_rank=1.0 if gpu else 0.0))
    try:
        n_q = max(1, min(8, len(ids) // 2))
        t0 = time.perf_counter()
        group.prefill("cli", ids[:-n_q])
        stats.prompt_tokens = len(ids)
        t1 = time.perf_counter()
        for t in group.generate("cli", ids[-n_q:], params):
            if stats.generated_tokens == 0:
                stats.prefill_s = time.perf_counter() - t0
                t1 = time.perf_counter()
            stats.generated_tokens += 1
            yield t
        stats.decode_s = time.perf_counter() - t1
        stats.stop_reason = "stop" if stats.generated_tokens < params.max_tokens else "length"
    finally:
        group.shutdown()


class UserError(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ringserve", description="ringserve: long-context LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    args = parser.parse_args(argv)
    from ringserve.workers.engine import PromptError, SessionError
    from ringserve.workers.group import GroupUnhealthy
    from ringserve.workers.loader import ModelLoadError
    from ringserve.workers.tokenizer import ChatTemplateError

    try:
        return args.func(args)
    except (UserError, ModelLoadError, PromptError, ChatTemplateError, ValueError, SessionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except GroupUnhealthy as e:  # a rank died: not the user's input, so a different exit status
        print(f"error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
