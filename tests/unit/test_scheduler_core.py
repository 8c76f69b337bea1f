"""The scheduler's decisions (SchedulerCore), step by step: what it plans from what was submitted and what
the ranks reported. No Ray, no engine: the step results are written here as the ranks would send them."""

import time

import pytest

from ringserve.workers.plan import StepEvent, StepResult
from ringserve.workers.protocol import (GenerationEnd, KVCapacityError, Progress, QueueFull, RequestCancelled,
                                        SamplingParams, SessionError)
from ringserve.workers.scheduler import SchedulerConfig, SchedulerCore


def result(plan, *events):
    return [StepResult(plan.step, 0, tuple(events))]


def progress(h, done):
    return StepEvent(h.id, "progress", progress=Progress(done, len(h.req.ids)))


def run_prefill(core, plan):
    """The ranks' answer to a plan: each scheduled prefill advances one chunk; a generate that finished its
    prompt gets its first token (1)."""
    evs = []
    for rid in plan.prefill:
        h = core.running[rid]
        done = len(h.req.ids) - h.remaining + min(core.cfg.prefill_chunk, h.remaining)
        evs.append(progress(h, done))
        if done == len(h.req.ids) and h.req.kind == "generate":
            evs.append(StepEvent(h.id, "token", token=1))
    return result(plan, *evs)


def test_short_prompts_go_first_and_a_long_create_is_never_starved():
    core = SchedulerCore(SchedulerConfig(prefill_chunk=100))
    create = core.submit("create", "big", range(1000))
    p = core.plan()
    assert [r.id for r in p.admit] == [create.id] and p.prefill == (create.id,)
    core.apply(p, run_prefill(core, p))
    ran_create = []
    for i in range(8):  # a stream of short prompts on other sessions, one per step
        g = core.submit("generate", f"s{i}", range(30), sampling=SamplingParams(max_tokens=4))
        p = core.plan()
        assert g.id in p.prefill  # a short prompt never waits behind the long create
        ran_create.append(create.id in p.prefill)
        core.apply(p, run_prefill(core, p))
    # the create yields to the prompts but runs at least every other step (the starvation guard)
    assert all(a or b for a, b in zip(ran_create, ran_create[1:])) and not all(ran_create)
    assert core.stats().preemptions == ran_create.count(False)
    # everything admitted that has its first token is in the decode batch
    p = core.plan()
    assert len(p.decode) == 8 and create.id not in p.decode


def test_one_request_per_session_in_arrival_order_and_the_queue_bound():
    core = SchedulerCore(SchedulerConfig(prefill_chunk=100, max_waiting=3))
    a1 = core.submit("append", "s", [1, 2])
    a2 = core.submit("append", "s", [3])
    b = core.submit("append", "t", [4])
    with pytest.raises(QueueFull, match="max_waiting 3"):
        core.submit("append", "u", [5])
    p = core.plan()
    assert [r.id for r in p.admit] == [a1.id, b.id]  # a2 waits for a1: the same session
    core.apply(p, result(p, progress(a1, 2), StepEvent(a1.id, "done", info=None),
                         progress(b, 1), StepEvent(b.id, "done", info=None)))
    assert a1.done and b.done
    p = core.plan()
    assert [r.id for r in p.admit] == [a2.id]


def test_cancel_a_waiting_request_at_once_and_a_running_one_at_the_next_step():
    core = SchedulerCore(SchedulerConfig(prefill_chunk=10, max_running=1))
    run = core.submit("generate", "s", [1, 2], sampling=SamplingParams(max_tokens=50))
    wait = core.submit("generate", "t", [1], sampling=SamplingParams(max_tokens=5))
    p = core.plan()
    core.apply(p, run_prefill(core, p))
    wait.cancel()
    assert wait.done and isinstance(wait.error, RequestCancelled)
    run.cancel()
    p = core.plan()
    assert p.ends == ((run.id, "cancel"),) and p.decode == ()  # it leaves the batch at this boundary
    core.apply(p, result(p, StepEvent(run.id, "failed", error=RequestCancelled("x"), computed=3)))
    assert run.done and run.computed == 3 and not core.has_work()


def test_a_delete_ends_the_sessions_request_fails_its_queue_and_reports_when_done():
    core = SchedulerCore(SchedulerConfig(prefill_chunk=10))
    create = core.submit("create", "s", range(50))
    later = core.submit("generate", "s", [1], sampling=SamplingParams(max_tokens=5))
    p = core.plan()
    core.apply(p, run_prefill(core, p))
    gone = []
    core.drop("s", lambda: gone.append(True))
    p = core.plan()
    assert p.drops == ("s",) and (create.id, "cancel") in p.ends and p.prefill == ()
    assert later.done and isinstance(later.error, SessionError)
    core.apply(p, result(p, StepEvent(create.id, "failed", error=RequestCancelled("x"))))
    assert gone == [True] and create.done and "deleted" in str(create.error)


def test_no_pages_waits_for_a_running_request_then_times_out():
    core = SchedulerCore(SchedulerConfig(prefill_chunk=10, queue_timeout_s=0.2))
    first = core.submit("generate", "a", [1], sampling=SamplingParams(max_tokens=5))
    p = core.plan()
    core.apply(p, run_prefill(core, p))
    big = core.submit("create", "b", range(5))
    p = core.plan()
    core.apply(p, result(p, StepEvent(big.id, "failed", error=KVCapacityError("no pages"))))
    assert not big.done and big.state == "waiting"  # requeued: `first` may free pages
    p = core.plan()
    assert p.admit == ()  # not retried until a running request finished
    core.apply(p, result(p, StepEvent(first.id, "done", end=GenerationEnd("length", 1, 5))))
    p = core.plan()
    assert [r.id for r in p.admit] == [big.id]
    time.sleep(0.25)
    core.apply(p, result(p, StepEvent(big.id, "failed", error=KVCapacityError("no pages"))))
    assert big.done and isinstance(big.error, KVCapacityError)  # nothing else runs: fail, with the numbers


def test_a_stop_string_ends_the_generate_at_the_next_step():
    from ringserve.workers.loader import load_tokenizer

    tok = load_tokenizer("default")
    core = SchedulerCore(SchedulerConfig(prefill_chunk=10), tok)
    g = core.submit("generate", "s", [1], sampling=SamplingParams(max_tokens=50), stops=["harbour"])
    p = core.plan()
    core.apply(p, run_prefill(core, p))
    for t in tok.encode(" the old harbour and"):
        p = core.plan()
        if p.ends:
            break
        assert p.decode == (g.id,)
        core.apply(p, result(p, StepEvent(g.id, "token", token=t)))
    assert p.ends == ((g.id, "stop_sequence"),) and "harbour" in g.text and g.text.endswith("harbour")
