#!/usr/bin/env python3
"""Drives an OpenAI-compatible server (slm serve, llama-server) with concurrent streaming
clients. Standard library only.

  serve_load.py load BASE --clients 64 --seconds 180 [--pid PID] [--key KEY]
      Clients loop on streamed chat completions for SECONDS; every fifth one disconnects
      mid-stream. Checks: no error, every finished stream ends with [DONE], RSS of PID stays
      bounded, and (from /metrics) the server stops generating for a client once it leaves.
      Prints a JSON summary; exits 1 when a check fails.

  serve_load.py throughput BASE --streams 16 --requests 3 --max-tokens 128
      STREAMS clients, each sending REQUESTS greedy completions of MAX_TOKENS tokens one after
      another; prints aggregate generated tokens/s and the median time to first token.
"""
import argparse
import http.client
import json
import statistics
import sys
import threading
import time
import urllib.parse

PROMPTS = [
    "Tell me about the sea.",
    "Write a short poem about a whale.",
    "What is the capital of France, and why is it famous?",
    "Explain how a sailing ship moves against the wind.",
    "Give three tips for learning to cook.",
    "Describe a storm at night.",
]


def connect(base):
    u = urllib.parse.urlparse(base)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=600)


def stream(base, key, body, on_chunk):
    """POSTs a streaming request; on_chunk(obj) per data chunk, returning False closes the
    connection (a client that leaves). Returns (status, saw_done, chunks, first_chunk_s)."""
    conn = connect(base)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = "Bearer " + key
    t0 = time.perf_counter()
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    conn.request("POST", path, json.dumps(body), headers)
    r = conn.getresponse()
    if r.status != 200:
        text = r.read().decode(errors="replace")
        conn.close()
        return r.status, False, 0, None, text
    done, chunks, first = False, 0, None
    while True:
        line = r.readline()
        if not line:
            break
        line = line.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            done = True
            break
        obj = json.loads(data)
        if "error" in obj:
            conn.close()
            return 500, False, chunks, first, json.dumps(obj)
        if first is None and obj.get("choices"):
            first = time.perf_counter() - t0
        chunks += 1
        if on_chunk(obj) is False:
            conn.close()
            return 200, None, chunks, first, ""
    conn.close()
    return 200, done, chunks, first, ""


def get(base, path, key=None):
    conn = connect(base)
    conn.request("GET", path, headers={"Authorization": "Bearer " + key} if key else {})
    r = conn.getresponse()
    body = r.read().decode()
    conn.close()
    return r.status, body


def metric(text, name):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def load(a):
    stop_at = time.time() + a.seconds
    lock = threading.Lock()
    s = {"finished": 0, "left": 0, "errors": [], "no_done": 0, "received": 0, "completion": 0}

    def client(i):
        n = 0
        leaves = i % 5 == 4
        while time.time() < stop_at:
            n += 1
            body = {
                "messages": [{"role": "user", "content": PROMPTS[(i + n) % len(PROMPTS)]}],
                "max_tokens": a.max_tokens,
                "temperature": 0.8,
                "seed": i * 1000 + n,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            if leaves:
                # It cannot finish before it leaves, so that every departure is one the server
                # must notice (a reply shorter than the leave point would not be).
                body["ignore_eos"] = True
            usage = {}
            leave_after = 3 + (i + n) % 5

            def on_chunk(obj, count=[0]):
                if obj.get("usage"):
                    usage.update(obj["usage"])
                count[0] += 1
                return not (leaves and count[0] >= leave_after)

            try:
                status, done, chunks, _, err = stream(a.base, a.key, body, on_chunk)
            except Exception as e:  # noqa: BLE001 - any failure is a finding
                with lock:
                    s["errors"].append(f"client {i}: {e!r}")
                continue
            with lock:
                s["received"] += chunks
                if status != 200:
                    s["errors"].append(f"client {i}: {status} {err[:200]}")
                elif done is None:
                    s["left"] += 1
                elif not done:
                    s["no_done"] += 1
                else:
                    s["finished"] += 1
                    s["completion"] += usage.get("completion_tokens", 0)

    _, m0 = get(a.base, "/metrics", a.key)
    rss = []
    threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        if a.pid:
            rss.append(rss_mb(a.pid))
        time.sleep(1)
    for t in threads:
        t.join()
    time.sleep(1.0)
    _, m1 = get(a.base, "/metrics", a.key)
    time.sleep(1.0)
    _, m2 = get(a.base, "/metrics", a.key)
    gen = lambda m: metric(m, "slm_tokens_predicted_total")  # noqa: E731
    generated = gen(m1) - gen(m0)
    cancelled = metric(m1, "slm_requests_cancelled_total") - metric(m0, "slm_requests_cancelled_total")
    out = {
        "clients": a.clients,
        "seconds": a.seconds,
        "streams_finished": s["finished"],
        "streams_left_midway": s["left"],
        "errors": s["errors"][:10],
        "error_count": len(s["errors"]),
        "finished_without_done": s["no_done"],
        "server_generated_tokens": generated,
        "tokens_of_finished_streams": s["completion"],
        "server_cancelled": cancelled,
        "generated_after_all_clients_left": gen(m2) - gen(m1),
        "running_after": metric(m2, "slm_requests_processing"),
        "rss_mb_first": rss[0] if rss else None,
        "rss_mb_max": max(rss) if rss else None,
        "rss_mb_last": rss[-1] if rss else None,
    }
    # Tokens generated for clients that left: all generated tokens minus those of finished
    # streams. Each client that left received some chunks first; what the server spent beyond
    # what was delivered is at most one step per departure when it stops at once.
    wasted = generated - s["completion"]
    out["tokens_for_left_streams"] = wasted
    out["tokens_per_left_stream"] = wasted / max(1, s["left"])
    print(json.dumps(out, indent=1))
    ok = (
        not s["errors"]
        and s["no_done"] == 0
        and s["finished"] > 0
        and s["left"] > 0
        and cancelled == s["left"]
        and out["generated_after_all_clients_left"] == 0
        and out["running_after"] == 0
        # A client that leaves after k chunks cost k generated tokens plus at most a step or
        # two in flight; the prompts' leave points are 3..7 chunks.
        and out["tokens_per_left_stream"] <= 7 + 2
        and (not rss or max(rss) <= a.max_rss_mb)
    )
    if not ok:
        print("FAILED", file=sys.stderr)
        sys.exit(1)


def throughput(a):
    lock = threading.Lock()
    tokens, firsts, errors = [0], [], []

    def client(i):
        for n in range(a.requests):
            body = {
                "prompt": PROMPTS[(i + n) % len(PROMPTS)],
                "max_tokens": a.max_tokens,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            usage = {}

            def on_chunk(obj):
                if obj.get("usage"):
                    usage.update(obj["usage"])
                return True

            status, done, chunks, first, err = stream(a.base, a.key, body, on_chunk)
            with lock:
                if status != 200 or not done:
                    errors.append(f"{status} {err[:200]}")
                tokens[0] += usage.get("completion_tokens", 0)
                if first is not None:
                    firsts.append(first)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(a.streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    print(json.dumps({
        "streams": a.streams,
        "generated_tokens": tokens[0],
        "seconds": wall,
        "tokens_per_second": tokens[0] / wall,
        "ttft_median_s": statistics.median(firsts) if firsts else None,
        "errors": errors[:5],
    }))
    if errors:
        sys.exit(1)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    l = sub.add_parser("load")
    l.add_argument("base")
    l.add_argument("--clients", type=int, default=64)
    l.add_argument("--seconds", type=float, default=180)
    l.add_argument("--max-tokens", type=int, default=48)
    l.add_argument("--pid", type=int)
    l.add_argument("--key")
    l.add_argument("--max-rss-mb", type=float, default=2048)
    t = sub.add_parser("throughput")
    t.add_argument("base")
    t.add_argument("--streams", type=int, default=1)
    t.add_argument("--requests", type=int, default=3)
    t.add_argument("--max-tokens", type=int, default=128)
    t.add_argument("--key")
    a = p.parse_args()
    load(a) if a.cmd == "load" else throughput(a)


if __name__ == "__main__":
    main()
