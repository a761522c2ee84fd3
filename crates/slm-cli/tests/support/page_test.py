"""The chat page of `slm serve` in headless Chromium, driven over WebDriver (chromedriver's
HTTP protocol, standard library only): it loads and lists the model, a message streams a
reply, Stop ends a reply and the server stops generating it, and a reply containing <script>
or <img onerror> shows as text. Usage: page_test.py BASE_URL"""
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

base = sys.argv[1]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


port = free_port()
driver = subprocess.Popen(
    [shutil.which("chromedriver"), f"--port={port}"],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
)
wd = f"http://127.0.0.1:{port}"


def call(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(wd + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read() or b"{}").get("value")


def wait(what, pred, timeout=60.0, every=0.05):
    t = time.time()
    while time.time() - t < timeout:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


for _ in range(100):
    try:
        call("GET", "/status")
        break
    except OSError:
        time.sleep(0.1)
chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
caps = {
    "capabilities": {
        "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
            },
        }
    }
}
session = call("POST", "/session", caps)["sessionId"]
S = f"/session/{session}"


def js(script, *args):
    return call("POST", S + "/execute/sync", {"script": script, "args": list(args)})


def element(css):
    v = call("POST", S + "/element", {"using": "css selector", "value": css})
    return next(iter(v.values()))


def click(css):
    call("POST", f"{S}/element/{element(css)}/click", {})


def type_into(css, text):
    call("POST", f"{S}/element/{element(css)}/value", {"text": text})


def last_reply():
    return js("const m = document.querySelectorAll('.msg.assistant'); "
              "return m.length ? m[m.length - 1].textContent : null;")


def metric(name):
    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


try:
    # The page and its policy: no inline scripts may run.
    with urllib.request.urlopen(base + "/", timeout=30) as r:
        csp = r.headers.get("Content-Security-Policy", "")
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp.split("script-src")[1].split(";")[0], csp
    call("POST", S + "/url", {"url": base + "/"})
    models = wait("the model list", lambda: js(
        "return [...document.querySelectorAll('#model option')].map(o => o.value);"))
    assert models == ["SmolLM2-135M-Instruct.Q4_1"], models

    # A message streams a reply: the text grows over several reads before it is complete.
    type_into("#input", "Write two sentences about the sea.")
    click("#send")
    lengths = set()

    def complete():
        text = last_reply() or ""
        if text and "tokens/s" not in text:
            lengths.add(len(text))
        return "tokens/s" in text

    wait("a complete reply", complete, timeout=120, every=0.02)
    assert len(lengths) >= 2, f"the reply did not stream: {lengths}"
    assert js("return document.querySelector('#send').disabled;") is False

    # Stop: a long reply is stopped, stops growing, and the server drops the sequence.
    cancelled = metric("slm_requests_cancelled_total")
    type_into("#input", "Write a very long story about a whale, with many chapters.")
    click("#send")
    wait("the reply to start", lambda: len(last_reply() or "") > 20)
    click("#stop")
    wait("the page to finish the reply", lambda: js("return !document.querySelector('#send').disabled;"))
    assert "stopped" in last_reply(), last_reply()
    frozen = last_reply()
    time.sleep(1.0)
    assert last_reply() == frozen, "the reply kept growing after Stop"
    wait("the server to cancel the sequence", lambda: metric("slm_requests_cancelled_total") > cancelled, timeout=10)
    running = metric("slm_requests_processing")
    assert running == 0, running

    # A reply with markup shows as text: the stream is replaced by one whose content is
    # hostile, and nothing of it becomes an element or runs.
    hostile = ('<script>window.pwned = 1</script> <img src=x onerror="window.pwned = 2"> '
               '[link](javascript:window.pwned=3) **bold** `<b>code</b>`')
    js("""
      const hostile = arguments[0];
      window.fetch = async () => {
        const chunk = {choices: [{index: 0, delta: {content: hostile}, finish_reason: null}]};
        const body = 'data: ' + JSON.stringify(chunk) + '\\n\\n' +
          'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\\n\\n' +
          'data: {"choices":[],"usage":{"completion_tokens":9}}\\n\\ndata: [DONE]\\n\\n';
        return new Response(body, {status: 200, headers: {'Content-Type': 'text/event-stream'}});
      };
    """, hostile)
    type_into("#input", "anything")
    click("#send")
    wait("the hostile reply", lambda: "window.pwned = 2" in (last_reply() or ""))
    time.sleep(0.5)
    found = js("""
      const m = document.querySelectorAll('.msg.assistant'); const last = m[m.length - 1];
      return {pwned: window.pwned === undefined ? null : window.pwned,
              scripts: last.querySelectorAll('script, img, iframe').length,
              links: [...last.querySelectorAll('a')].map(a => a.getAttribute('href')),
              strong: last.querySelectorAll('strong').length,
              text: last.textContent};
    """)
    assert found["pwned"] is None, found
    assert found["scripts"] == 0, found
    assert found["links"] == [], found
    assert found["strong"] == 1, found
    assert "<script>window.pwned = 1</script>" in found["text"], found
    assert '<img src=x onerror="window.pwned = 2">' in found["text"], found
    print("page: ok")
finally:
    try:
        call("DELETE", S)
    except Exception:  # noqa: BLE001
        pass
    driver.kill()
