"""The `ringserve` command line.

    ringserve generate [--model default|DIR|FILE.gguf] [--file DOC] [--max-tokens N]
                       [--temperature T --top-p P --top-k K --seed S] [--max-context N] "question"

streams the answer to the terminal. A user error (missing model, empty or too-long prompt) prints
one line starting with "error:" and exits with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys


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
    p.add_argument("--raw", action="store_true",
                   help="do not apply the chat template: the prompt is tokenized as written, control tokens "
                        "such as <|im_start|> included")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--stats", action="store_true", help="print prefill and decode speed to stderr")
    p.add_argument("--sp", type=int, default=1,
                   help="ranks of a sequence-parallel group on a local Ray (gloo on CPU, NCCL on GPUs); "
                        "1 (default) runs on one device without Ray")
    p.set_defaults(func=cmd_generate)


def _add_serve(sub):
    p = sub.add_parser("serve", help="start a local ringserve cluster (Ray + Serve + Redis) and serve gRPC")
    p.add_argument("--config", help="YAML cluster config (see ringserve.cluster.config.ServeConfig)")
    p.add_argument("--port", type=int, default=None, help="gRPC port (default 50051)")
    p.add_argument("--api-key", default=None, help="development API key (default: a random one, printed)")
    p.add_argument("--model", default=None, help="model for every group (default: the config's, else 'default')")
    p.add_argument("--groups", type=int, default=None, help="sequence-parallel groups (default 1)")
    p.add_argument("--sp", type=int, default=None, help="ranks per group (default 2)")
    p.add_argument("--redis-url", default=None, help="Redis for sessions and KV (default: start a local redis-server)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    p.add_argument("--http-port", type=int, default=None, help="Serve's HTTP proxy port (default 8000)")
    p.add_argument("--max-receive-bytes", type=int, default=None,
                   help="largest request message accepted; bigger ones get RESOURCE_EXHAUSTED (default 64 MiB)")
    t = p.add_argument_group("TLS (default: plaintext, for clients on this machine)")
    t.add_argument("--tls-cert", default=None, help="PEM certificate chain of the server: gRPC over TLS on --port")
    t.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert (unencrypted)")
    t.add_argument("--tls-client-ca", default=None,
                   help="PEM CA bundle: clients must present a certificate it signed (mutual TLS)")
    t.add_argument("--plaintext-port", type=int, default=None,
                   help="with TLS: Serve's own plaintext gRPC port, for this machine (default: a free port)")
    d = p.add_argument_group("Ray dashboard")
    d.add_argument("--dashboard-port", type=int, default=None,
                   help="port of the Ray dashboard (default 8265, or the next free one)")
    d.add_argument("--dashboard-host", default="127.0.0.1",
                   help="address it listens on (default 127.0.0.1, this machine only; reach it from elsewhere "
                        "with `ssh -L 8265:127.0.0.1:8265 HOST`)")
    d.add_argument("--no-dashboard", action="store_true", help="do not start the Ray dashboard")
    d.add_argument("--ray-token-file", default=None,
                   help="file with Ray's authentication token, created when missing (default: Ray's own, "
                        "~/.ray/auth_token); the dashboard asks for this token")
    p.set_defaults(func=cmd_serve)


STOP_TIMEOUT_S = 8.0  # Ctrl-C / SIGTERM: everything is down within this (plus the exit itself)


class _Stop(BaseException):
    """Raised in the main thread by SIGINT / SIGTERM: unwinds `ringserve serve` into its shutdown."""


def _on_signal(signum, frame):
    raise _Stop(signal.Signals(signum).name)


def cmd_serve(args) -> int:
    import secrets
    import time
    from dataclasses import replace

    from ringserve.cluster.config import ApiKey, ServeConfig, TlsConfig
    from ringserve.cluster.serve_app import LocalRay, LocalRedis, free_port, start, stop

    cfg = ServeConfig.from_yaml(args.config) if args.config else ServeConfig.from_dict({
        "group": {"sp": 2, "num_cpus_per_rank": 0.25, "kv_device_bytes": 256 << 20, "kv_host_bytes": 512 << 20}})
    key = args.api_key or ("rs-dev-" + secrets.token_hex(12))
    # plaintext calls are for this machine only (cluster/tls.py: transport_refusal)
    changes = {"api_keys": cfg.api_keys + (ApiKey.from_plain(key, "dev", admin=True),), "plaintext_peers": "loopback"}
    tls = cfg.tls
    if args.tls_cert or args.tls_key or args.tls_client_ca:
        if not (args.tls_cert and args.tls_key):
            raise UserError("--tls-cert and --tls-key go together (and --tls-client-ca needs both)")
        tls = TlsConfig(cert_file=args.tls_cert, key_file=args.tls_key, client_ca_file=args.tls_client_ca,
                        port=cfg.tls.port if cfg.tls else cfg.grpc_port)
        changes["grpc_port"] = free_port()  # Serve's plaintext port moves aside; clients use TLS on --port
    if tls is not None:
        changes["tls"] = replace(tls, port=args.port) if args.port else tls
        if args.plaintext_port:
            changes["grpc_port"] = args.plaintext_port
    elif args.port:
        changes["grpc_port"] = args.port
    if args.plaintext_port and tls is None:
        raise UserError("--plaintext-port is for TLS (--tls-cert, --tls-key); without TLS use --port")
    if args.max_receive_bytes:
        changes["max_receive_bytes"] = args.max_receive_bytes
    if args.http_port:
        changes["http_port"] = args.http_port
    if args.groups:
        changes["groups"] = args.groups
    group = cfg.group
    if args.model:
        changes["model"] = args.model
        group = replace(group, model=args.model)
    if args.sp:
        group = replace(group, sp=args.sp)
    local = LocalRay(num_cpus=args.num_cpus, dashboard=not args.no_dashboard, dashboard_host=args.dashboard_host,
                     dashboard_port=args.dashboard_port, token_file=args.ray_token_file)
    signals = (signal.SIGINT, signal.SIGTERM)
    for s in signals:
        signal.signal(s, _on_signal)
    redis = None
    reason = None  # the signal that stopped us; None: startup failed and its error propagates
    try:
        url = args.redis_url or cfg.redis_url
        if not url:
            redis = LocalRedis()
            url = redis.url
        changes["redis_url"] = url
        changes["group"] = replace(group, redis_url=group.redis_url or url)
        cfg = replace(cfg, **changes)
        info = start(cfg, local)
        for s in signals:  # ray.init installs its own SIGTERM handler (sys.exit): ours again
            signal.signal(s, _on_signal)
        print(serve_banner(cfg, key, url, info), flush=True)
        while True:
            time.sleep(3600)
    except _Stop as e:
        reason = str(e)
    finally:
        for s in signals:  # a second Ctrl-C must not cut the bounded shutdown short
            signal.signal(s, signal.SIG_IGN)
        t0 = time.monotonic()
        print(f"stopping ringserve{f' ({reason})' if reason else ''}: Serve, Ray"
              f"{', redis-server' if redis else ''} ...", flush=True)
        done = stop(redis, timeout_s=STOP_TIMEOUT_S)
        print(f"stopped in {time.monotonic() - t0:.1f} s"
              + ("" if done.clean else " (Serve did not finish in time: its processes were stopped)")
              + (f"; killed, still running at the deadline: {', '.join(done.killed)}" if done.killed else ""),
              flush=True)
        if reason:
            # Everything this command started is gone: exit now. The interpreter's teardown (Ray's
            # and gRPC's exit hooks, 1-2 s here) has nothing left to release, and after an unclean
            # stop Ray's hooks would touch a worker under Serve's unfinished shutdown.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    return 0


def serve_banner(cfg, key: str, redis_url: str, info) -> str:
    """What `ringserve serve` prints once it is ready: the gRPC address and key, the Ray dashboard and
    how to sign in to it, where Prometheus finds the metrics."""
    from ringserve.cluster.serve_app import DEFAULT_RAY_TOKEN_FILE

    what = (f"{cfg.groups} group(s) of {cfg.group.sp} ranks, model {cfg.model}, Redis {redis_url}")
    if cfg.tls is not None:
        api_port = cfg.tls.port
        lines = [f"ringserve is serving gRPC over TLS on port {api_port} of every interface ({what})",
                 f"  certificate {cfg.tls.cert_file}; "
                 + (f"client certificates required (mutual TLS), signed by {cfg.tls.client_ca_file}"
                    if cfg.tls.client_ca_file else "no client certificates asked (API keys authenticate)"),
                 f"  plaintext gRPC for this machine only: localhost:{cfg.grpc_port}"]
    else:
        api_port = cfg.grpc_port
        lines = [f"ringserve is serving gRPC on localhost:{api_port} ({what})",
                 "  PLAINTEXT (no TLS), for clients on this machine; to serve other machines start it with "
                 "--tls-cert and --tls-key"]
    if info is not None and info.dashboard_url:
        lines.append(f"Ray dashboard: {info.dashboard_url}")
        if info.token_source:
            src = info.token_source
            if not src.startswith("/"):
                how = f"Ray token: {src}"
            elif src == DEFAULT_RAY_TOKEN_FILE:  # Ray's CLI reads this one
                how = f"Ray token file: {src} (`ray get-auth-token` prints it)"
            else:
                how = f"Ray token file: {src} (`cat {src}`)"
            lines.append(f"  sign in with Ray's authentication token — {how}")
        else:
            lines.append("  WARNING: Ray token authentication is off (RAY_AUTH_MODE): anyone who reaches the port "
                         "controls the cluster")
        if info.dashboard_url.startswith(("http://127.", "http://localhost")):
            port = info.dashboard_url.rsplit(":", 1)[-1].strip("/")
            lines.append(f"  from another machine: ssh -L {port}:127.0.0.1:{port} THIS_HOST, then open "
                         f"http://localhost:{port}")
    if info is not None:
        lines.append(f"Prometheus metrics: {info.metrics_url} (Ray session {info.session_name})")
        if info.service_discovery:
            lines.append(f"  every node's endpoint, for Prometheus file_sd: {info.service_discovery}")
        lines.append("  scrape config and alerts: deploy/prometheus/; Grafana dashboard: deploy/grafana/ringserve.json")
    connect = f"Client('localhost:{api_port}', api_key='{key}')"
    if cfg.tls is not None:
        connect = (f"Client('localhost:{api_port}', api_key='{key}', secure=True, ca='ca.pem'"
                   + (", client_cert='client.pem', client_key='client.key'" if cfg.tls.client_ca_file else "")
                   + f")  # ca.pem: the CA that signed {cfg.tls.cert_file}")
    lines += [f"development API key (tenant 'dev', admin): {key}",
              "try:\n"
              "  from ringserve.client import Client\n"
              f"  client = {connect}\n"
              "  with client.create_session('Ringserve keeps long contexts on a group of workers.', ttl='1h') as s:\n"
              "      print(s.generate('What does ringserve keep?').text())",
              "Ctrl-C stops everything."]
    return "\n".join(lines)


def _client_args(p):
    p.add_argument("--address", default=None, help="gRPC address (default $RINGSERVE_ADDRESS or localhost:50051)")
    p.add_argument("--api-key", default=None, help="API key (default $RINGSERVE_API_KEY)")
    p.add_argument("--tls", action="store_true", default=None,
                   help="connect with TLS, checking the server against the system's roots (default $RINGSERVE_TLS=1)")
    p.add_argument("--ca", default=None, help="PEM CA bundle that signed the server's certificate; implies --tls "
                                              "(default $RINGSERVE_CA)")
    p.add_argument("--client-cert", default=None, help="PEM client certificate, for servers that require one "
                                                       "(default $RINGSERVE_CLIENT_CERT)")
    p.add_argument("--client-key", default=None, help="PEM key of --client-cert (default $RINGSERVE_CLIENT_KEY)")
    p.add_argument("--server-name", default=None,
                   help="name the server's certificate must carry, when it is not the host of --address")


def _add_client_commands(sub):
    s = sub.add_parser("session", help="create, list, show, extend or delete retained sessions")
    ss = s.add_subparsers(dest="action", required=True)
    c = ss.add_parser("create", help="create a session from a file (prints its name)")
    c.add_argument("--file", required=True, help="the document to retain")
    c.add_argument("--ttl", default="1h", help="lifetime, e.g. 90s, 30m, 2h, 1d (default 1h)")
    c.add_argument("--retention", default="standard", choices=["hot", "standard", "cold"])
    c.add_argument("--persist", default="on_demote", choices=["on_demote", "write_through"])
    c.add_argument("--name", default="", help="display name")
    c.add_argument("--kv-format", default="exact",
                   help="how its KV is stored (and priced): exact, fp8, int4 or keep:<fraction> (default exact)")
    for name, hlp in (("list", "list your sessions"), ("get", "show one session"), ("delete", "delete a session")):
        q = ss.add_parser(name, help=hlp)
        if name != "list":
            q.add_argument("session")
    e = ss.add_parser("extend", help="set a session's time to live from now")
    e.add_argument("session")
    e.add_argument("--ttl", required=True)
    f = ss.add_parser("set-format", help="store a session in a smaller KV format (never back up)")
    f.add_argument("session")
    f.add_argument("kv_format", help="fp8, int4 or keep:<fraction>")
    for q in [c, e, f] + [ss.choices[n] for n in ("list", "get", "delete")]:
        _client_args(q)
    s.set_defaults(func=cmd_session)
    a = sub.add_parser("ask", help="ask a question against a session (streams the answer)")
    a.add_argument("session")
    a.add_argument("question")
    a.add_argument("--max-tokens", type=int, default=256)
    a.add_argument("--temperature", type=float, default=0.0)
    a.add_argument("--retain", action="store_true", help="keep the question and answer in the session")
    _client_args(a)
    a.set_defaults(func=cmd_ask)
    st = sub.add_parser("status", help="worker groups, ranks, memory per tier, sessions (admin key)")
    _client_args(st)
    st.set_defaults(func=cmd_status)
    u = sub.add_parser("usage", help="usage and cost over a time window (token-hours by tier, tokens, cost)")
    u.add_argument("--since", default="24h", help="window back from now, e.g. 1h, 24h, 7d (default 24h)")
    u.add_argument("--group-by", default="session", choices=["session", "tier", "day", "kv_format"])
    u.add_argument("--format", default="table", choices=["table", "csv", "jsonl"],
                   help="table (default): line items and totals; csv / jsonl: every usage record")
    u.add_argument("--session", default=None, help="only this session")
    u.add_argument("--tenant", default="", help="another tenant's usage (admin key)")
    _client_args(u)
    u.set_defaults(func=cmd_usage)


def _client(args):
    import os

    from ringserve.client import Client

    env = os.environ
    return Client(args.address or env.get("RINGSERVE_ADDRESS", "localhost:50051"),
                  api_key=args.api_key or env.get("RINGSERVE_API_KEY"),
                  secure=bool(args.tls) or env.get("RINGSERVE_TLS", "") in ("1", "true", "yes"),
                  ca=args.ca or env.get("RINGSERVE_CA") or None,
                  client_cert=args.client_cert or env.get("RINGSERVE_CLIENT_CERT") or None,
                  client_key=args.client_key or env.get("RINGSERVE_CLIENT_KEY") or None,
                  server_name=args.server_name)


def _show(s) -> str:
    exp = s.expire_time.strftime("%Y-%m-%d %H:%M:%S UTC") if s.expire_time else "-"
    tok_h = sum(s.token_seconds.values()) / 3600
    cost = f"  {tok_h:,.1f} tok-h  {s.cost_accrued:.6f} {s.currency}" if s.currency else ""
    return (f"{s.name}  {s.size_tokens:>9} tok  {s.tier:<6} {s.retention:<8} {s.kv_format:<9} "
            f"group {s.group or '-':<8} expires {exp}{cost}")


def cmd_session(args) -> int:
    with _client(args) as c:
        if args.action == "create":
            with open(args.file, encoding="utf-8") as f:
                text = f.read()
            s = c.create_session(text, ttl=args.ttl, retention=args.retention, persist=args.persist,
                                 display_name=args.name, kv_format=args.kv_format, progress=True)
            print(_show(s))
        elif args.action == "list":
            for s in c.list_sessions():
                print(_show(s))
        elif args.action == "get":
            print(_show(c.get_session(args.session)))
        elif args.action == "extend":
            s = c.get_session(args.session)
            s.extend(ttl=args.ttl)
            print(_show(s))
        elif args.action == "set-format":
            print(_show(c.get_session(args.session).set_kv_format(args.kv_format)))
        elif args.action == "delete":
            c.get_session(args.session).delete()
            print(f"deleted {args.session}")
    return 0


def cmd_ask(args) -> int:
    with _client(args) as c:
        g = c.get_session(args.session).generate(args.question, max_tokens=args.max_tokens,
                                                 temperature=args.temperature, retain_turn=args.retain)
        for delta in g:
            sys.stdout.write(delta)
            sys.stdout.flush()
        print()
    return 0


def cmd_status(args) -> int:
    with _client(args) as c:
        st = c.status()
    print(format_status(st))
    return 0


def format_status(st) -> str:
    """A StatusResponse as a table: one line per group, then one per rank."""
    def mib(d, t):
        return d.get(t, 0) / 2**20

    rows = [f"{st.sessions} session(s), {st.metered_sessions} metered; Redis "
            f"{'ok' if st.redis_healthy else 'UNREACHABLE'}",
            f"{'group / rank':<14} {'device':<8} {'health':<8} {'sessions':>8} {'hbm MiB':>10} {'host MiB':>10} "
            f"{'redis MiB':>10} {'free hbm MiB':>13}"]
    rows.append("-" * len(rows[-1]))
    for g in st.groups:
        rows.append(f"{g.id:<14} {'':<8} {'ok' if g.healthy else 'DOWN':<8} {g.sessions:>8} "
                    f"{mib(g.kv_bytes, 'hbm'):>10.1f} {mib(g.kv_bytes, 'host'):>10.1f} {mib(g.kv_bytes, 'redis'):>10.1f} "
                    f"{g.free_kv_bytes / 2**20:>13.1f}")
        q = g.scheduler
        rows.append(f"  scheduler: {q.waiting} waiting, {q.running} running ({q.prefilling} prefilling, "
                    f"{q.decoding} decoding); last step {q.last_step_seconds * 1000:.0f} ms, batch {q.last_batch}; "
                    f"{q.steps} steps, {q.prefill_tokens} prefill + {q.decode_tokens} decode tokens, "
                    f"{q.preemptions} preemptions")
        for r in g.ranks:
            rows.append(f"  rank {r.rank:<7} {r.device:<8} {'ok' if r.healthy else 'DOWN':<8} {'':>8} "
                        f"{mib(r.kv_bytes, 'hbm'):>10.1f} {mib(r.kv_bytes, 'host'):>10.1f} "
                        f"{mib(r.kv_bytes, 'redis'):>10.1f} {r.free_kv_bytes / 2**20:>13.1f}")
    return "\n".join(rows)


def cmd_usage(args) -> int:
    with _client(args) as c:
        if args.format != "table":
            for chunk in c.export_usage(args.since, format=args.format, session=args.session, tenant=args.tenant):
                sys.stdout.write(chunk)
            return 0
        u = c.usage(args.since, group_by=args.group_by, session=args.session, tenant=args.tenant)
    print(format_usage(u, args.group_by))
    return 0


def format_usage(u, group_by: str) -> str:
    """A GetUsageResponse as a table: token-hours per tier, tokens, cost."""
    head = (f"{group_by:<20} {'hbm tok-h':>12} {'host tok-h':>12} {'redis tok-h':>12} {'prefill':>10} "
            f"{'cached':>10} {'generated':>10} {'cost ' + u.currency:>14}")
    rows = [head, "-" * len(head)]

    def line(item) -> str:
        th = {t: item.token_seconds.get(t, 0.0) / 3600 for t in ("hbm", "host", "redis")}
        return (f"{item.key:<20} {th['hbm']:>12,.2f} {th['host']:>12,.2f} {th['redis']:>12,.2f} "
                f"{item.prefill_tokens:>10,} {item.cached_tokens:>10,} {item.generated_tokens:>10,} {item.cost:>14.6f}")

    rows += [line(item) for item in u.line_items] + ["-" * len(head), line(u.total)]
    start = u.start_time.ToDatetime().strftime("%Y-%m-%d %H:%M")
    end = u.end_time.ToDatetime().strftime("%Y-%m-%d %H:%M")
    rows.append(f"{start} .. {end} UTC; of the total, {u.accruing_cost:.6f} {u.currency} is still accruing "
                "(live sessions, not yet closed into ledger records)")
    return "\n".join(rows)


def build_messages(prompt: str, document: str | None) -> list[dict]:
    """The document and the question as one user message: the form SmolLM2 answers best (ANCHORS.md)."""
    content = f"{document}\n\n{prompt}" if document else prompt
    return [{"role": "user", "content": content}]


def cmd_generate(args) -> int:
    import torch

    from ringserve.workers.engine import GenerationStats
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
    # --raw: the prompt as the user wrote it, template and control tokens included
    if args.raw:
        ids = tok.encode(args.prompt, special_tokens=True)
    else:
        ids = tok.encode_chat(build_messages(args.prompt, doc))
    stats = GenerationStats()
    stream = tok.stream()
    if len(ids) < 2:
        raise UserError("the prompt needs at least 2 tokens")
    if args.sp == 1:
        tokens = _generate_local(args, loaded, ids, params, stats)
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


def _split_prompt(ids: list[int]) -> tuple[list[int], list[int]]:
    """The session (the document) and the question (its last few tokens), the same at every --sp: the
    session is prefilled with ring attention, the question goes in as a pass-Q prompt."""
    n_q = max(1, min(8, len(ids) // 2))
    return ids[:-n_q], ids[-n_q:]


def _generate_local(args, loaded, ids, params, stats):
    """--sp 1: the one engine, in this process, over its own device-only paged KV store."""
    from ringserve.workers.engine import ShardEngine

    import time

    eng = ShardEngine(loaded, max_context=args.max_context)
    context, question = _split_prompt(ids)
    t0 = time.perf_counter()
    eng.prefill("cli", context)
    t_context = time.perf_counter() - t0
    yield from eng.generate("cli", question, params, stats=stats)
    stats.prompt_tokens, stats.prefill_s = len(ids), stats.prefill_s + t_context


def _generate_on_group(args, ids, params, stats, *, gpu: bool):
    """The same request on a local WorkerGroup of args.sp ranks: the document is prefilled with ring
    attention, the last few tokens are sent as the question (pass-Q), then SP decode."""
    import time

    import ray

    from ringserve.workers.group import GroupConfig, WorkerGroup

    if not ray.is_initialized():
        ray.init(num_cpus=max(2, args.sp), include_dashboard=False, log_to_driver=False)
    group = WorkerGroup(GroupConfig(sp=args.sp, model=args.model, max_context=args.max_context,
                                    num_cpus_per_rank=1.0 if gpu else max(0.25, 2 / args.sp),
                                    num_gpus_per_rank=1.0 if gpu else 0.0))
    try:
        context, question = _split_prompt(ids)
        t0 = time.perf_counter()
        group.prefill("cli", context)
        stats.prompt_tokens = len(ids)
        t1 = time.perf_counter()
        for t in group.generate("cli", question, params):
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


def _add_bench(sub):
    from .recall import add_parser

    p = sub.add_parser("bench", help="benchmarks a user runs against a server or in process")
    add_parser(p.add_subparsers(dest="bench", required=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ringserve", description="ringserve: long-context LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_serve(sub)
    _add_client_commands(sub)
    _add_bench(sub)
    args = parser.parse_args(argv)
    if args.command in ("session", "ask", "status", "usage"):  # the SDK only: no torch, no ray
        from ringserve.client import RingServeError

        try:
            return args.func(args)
        except (RingServeError, ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    from ringserve.workers.engine import PromptError, SessionError
    from ringserve.workers.group import GroupUnhealthy
    from ringserve.workers.loader import ModelLoadError
    from ringserve.workers.tokenizer import ChatTemplateError

    from ringserve.client import RingServeError

    try:
        return args.func(args)
    except (UserError, ModelLoadError, PromptError, ChatTemplateError, ValueError, SessionError, OSError,
            RingServeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except GroupUnhealthy as e:  # a rank died: not the user's input, so a different exit status
        print(f"error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
