"""Functions run on every rank of a spawned gloo group by the sequence-parallel tests."""

import torch
import torch.distributed as dist


def prefill_and_generate(rank, world, model_spec, ids, n_tokens, chunk, question):
    from ringserve.workers.engine import ShardEngine
    from ringserve.workers.loader import load_model
    from ringserve.workers.sampling import SamplingParams

    eng = ShardEngine(load_model(model_spec), dist.group.WORLD, prefill_chunk=chunk, block=8)
    rows_seen = []  # tokens each layer call processes on this rank: the activation-memory bound
    eng.model.layers[0].register_forward_hook(lambda mod, args, out: rows_seen.append(args[0].shape[0]))
    logits, pos = eng.prefill("s1", ids, logits="all")
    gathered = [None] * world
    dist.all_gather_object(gathered, (logits, pos))
    full = torch.empty(len(ids), logits.shape[-1])
    for lg, ps in gathered:
        full[ps] = lg
    eng.drop("s1")
    progress = []
    eng.prefill("s2", ids, progress=lambda d, t: progress.append((d, t)))
    greedy = list(eng.generate("s2", question, SamplingParams(max_tokens=n_tokens), stop_ids=frozenset()))
    return {"max_rows": max(rows_seen), "logits": full, "greedy": greedy, "progress": progress,
            "local_tokens": eng.store.state("s2").tokens, "session_len": eng.length("s2"),
            "modes": [m.mode for m in eng.modes]}
