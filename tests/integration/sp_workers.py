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


def service_path_session(rank, world, model_spec, parts, chunk, block, answer_tokens):
    """Build a session the way the service does — a create in several prefill chunks, an append, a
    retained turn, another append — then the same tokens as one prefill; report what each gave and
    what the store counted on the way."""
    from ringserve.workers.engine import ShardEngine
    from ringserve.workers.loader import load_model
    from ringserve.workers.sampling import SamplingParams

    group = dist.group.WORLD if world > 1 else None
    eng = ShardEngine(load_model(model_spec), group, prefill_chunk=chunk, block=block)
    st = eng.store
    context, more, turn, more2, question = parts
    greedy = SamplingParams(max_tokens=answer_tokens)
    progress = []
    eng.prefill("svc", context, progress=lambda d, t: progress.append((d, t)))
    create_modes = [m.mode for m in eng.modes]
    c0, local0 = st.counters(), st.state("svc").tokens
    after_create = eng.length("svc")
    logits_more = eng.append("svc", more)
    c1, local1 = st.counters(), st.state("svc").tokens
    answer = list(eng.generate("svc", turn, greedy, retain=True, stop_ids=frozenset()))
    logits_more2 = eng.append("svc", more2)
    # answering without retaining: new pages only for the question and answer, freed afterwards
    c2, free2 = st.counters(), st.stats()["tiers"]["device"]["free_pages"]
    asked = list(eng.generate("svc", question, greedy, stop_ids=frozenset()))
    c3, free3 = st.counters(), st.stats()["tiers"]["device"]["free_pages"]

    tokens = context + more + turn + answer + more2
    logits, pos = eng.prefill("ref", tokens, logits="all")
    gathered = [None] * world
    if group is not None:
        dist.all_gather_object(gathered, (logits, pos))
    else:
        gathered = [(logits, pos)]
    full = torch.empty(len(tokens), logits.shape[-1])
    for lg, ps in gathered:
        full[ps] = lg
    ref_asked = list(eng.generate("ref", question, greedy, stop_ids=frozenset()))
    return {"progress": progress, "create_modes": create_modes, "modes": [(m.session, m.mode) for m in eng.modes],
            "after_create": after_create, "logits_more": logits_more, "logits_more2": logits_more2,
            "answer": answer, "asked": asked, "ref_asked": ref_asked, "full": full, "tokens": tokens,
            "length": eng.length("svc"), "token_bytes": eng.geometry.token_bytes, "block": block,
            "append_written": c1.bytes_written - c0.bytes_written, "append_local": local1 - local0,
            "append_copied": c1.bytes_copied - c0.bytes_copied, "append_pages": c1.pages_allocated - c0.pages_allocated,
            "ask_pages": c3.pages_allocated - c2.pages_allocated, "ask_copied": c3.bytes_copied - c2.bytes_copied,
            "free_before_ask": free2, "free_after_ask": free3}


def long_create_modes(rank, world, model_spec, n_tokens, chunk):
    """A long create at SP = world: how the engine attended each chunk, and its progress."""
    from ringserve.workers.engine import ShardEngine
    from ringserve.workers.loader import load_model

    eng = ShardEngine(load_model(model_spec), dist.group.WORLD, prefill_chunk=chunk)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, eng.cfg.vocab_size, (n_tokens,), generator=g).tolist()
    progress = []
    eng.prefill("long", ids, progress=lambda d, t: progress.append((d, t)))
    return {"modes": [(m.mode, m.tokens, m.context) for m in eng.modes], "progress": progress,
            "local": eng.store.state("long").tokens, "ring_steps": eng.comm.steps}


def batch_vs_solo(rank, world, model_spec, contexts, questions, n_tokens, sampling):
    """Every session answered alone, then all at once in decode batches: the tokens of each, the solo
    runs' top-2 logits per step (rank 0), and the largest decode batch the scheduler formed."""
    from ringserve.workers.engine import ShardEngine
    from ringserve.workers.executor import StepExecutor
    from ringserve.workers.loader import load_model
    from ringserve.workers.protocol import SamplingParams
    from ringserve.workers.scheduler import SchedulerConfig, SchedulerCore, run_local

    group = dist.group.WORLD if world > 1 else None
    eng = ShardEngine(load_model(model_spec), group, prefill_chunk=64, block=8, kv_device_bytes=8 << 20)
    for i, ctx in enumerate(contexts):
        eng.prefill(f"s{i}", ctx)
    core = SchedulerCore(SchedulerConfig(eng.prefill_chunk))
    ex = StepExecutor(eng, record_top2=True)
    params = [SamplingParams(max_tokens=n_tokens, **sampling, **({"seed": 100 + i} if sampling else {}))
              for i in range(len(contexts))]
    solo, top2 = [], []
    for i, q in enumerate(questions):
        h = core.submit("generate", f"s{i}", q, sampling=params[i], stop_ids=())
        solo.append([x for x in run_local(core, ex, h) if isinstance(x, int)])
        top2.append(ex.top2.pop(h.id, []))
    handles = [core.submit("generate", f"s{i}", q, sampling=params[i], stop_ids=()) for i, q in enumerate(questions)]
    batch = [[] for _ in handles]
    biggest = 0
    while not all(h.done for h in handles):
        plan = core.plan()
        biggest = max(biggest, len(plan.decode))
        core.apply(plan, [ex.step(plan)])
        for i, h in enumerate(handles):
            batch[i] += [x for x in h.pending() if isinstance(x, int)]
    lengths = [eng.length(f"s{i}") for i in range(len(contexts))]
    return {"solo": solo, "batch": batch, "top2": top2, "biggest": biggest, "lengths": lengths}
