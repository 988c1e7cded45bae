"""Both sides of a slowloris attack in network namespaces, each run with `ip netns exec`.

    python slowloris.py stranger HOST PORT COUNT OPEN_FOR STOP_AFTER [REOPEN_BUDGET]
        Opens COUNT connections to HOST:PORT at once, each sending a request that never ends one
        byte a second; a closed one is reopened (at most REOPEN_BUDGET times in all) during the
        first OPEN_FOR seconds. Stops when every connection is closed, or after STOP_AFTER seconds.
        Prints one JSON object: per connection [connected, first byte sent, closed] in seconds
        from the start (None: never), and how many were still open at the end.

    python slowloris.py owner PORT STRANGER SECONDS
        Inside the node's namespace: polls http://127.0.0.1:PORT/api/health (1 s timeout) and
        counts the connections the node has accepted from STRANGER (`ss`), every 0.25 s for
        SECONDS. Prints one JSON object: the latencies (None: unanswered) and the counts.

Bounded in count and time; used by tests/rooms/test_apis_http_gate.py only.
"""

import errno
import json
import resource
import selectors
import socket
import subprocess
import sys
import time
import urllib.request

REQUEST_START = b"GET /api/health HTTP/1.1\r\nHost: node\r\nX-Slow: "


def stranger(host, port, count, open_for, stop_after, reopen_budget=0):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, count + 200)), hard))
    selector, started = selectors.DefaultSelector(), time.monotonic()
    records, live = [], {}  # live: socket -> [record, bytes sent, next send time]

    def open_one():
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        code = sock.connect_ex((host, port))
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            return
        record = [None, None, None]
        records.append(record)
        live[sock] = [record, 0, 0.0]
        selector.register(sock, selectors.EVENT_WRITE)

    def closed(sock, now):
        live.pop(sock)[0][2] = now
        selector.unregister(sock)
        sock.close()

    for _ in range(count):
        open_one()
    while live and time.monotonic() - started < stop_after:
        now = time.monotonic() - started
        for key, events in selector.select(timeout=0.1):
            sock, state = key.fileobj, live[key.fileobj]
            if state[0][0] is None:  # the connect finished, or failed
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    closed(sock, now)
                    continue
                state[0][0] = now
                selector.modify(sock, selectors.EVENT_READ)
                continue
            try:
                if not sock.recv(4096):
                    closed(sock, now)
            except OSError:  # a reset
                closed(sock, now)
        for sock, state in list(live.items()):
            if state[0][0] is None or state[2] > now:
                continue
            piece = REQUEST_START if state[1] == 0 else b"a"
            try:
                sock.send(piece)
            except OSError:
                closed(sock, now)
                continue
            state[0][1] = now if state[1] == 0 else state[0][1]
            state[1], state[2] = state[1] + 1, now + 1.0
        while len(live) < count and reopen_budget > 0 and now < open_for:
            reopen_budget -= 1
            open_one()
    still_open = len(live)
    for sock in list(live):
        sock.close()
    return {"records": records, "still_open": still_open, "seconds": time.monotonic() - started}


def owner(port, stranger_address, seconds):
    url = "http://127.0.0.1:%d/api/health" % port
    latencies, held, started = [], [], time.monotonic()
    while time.monotonic() - started < seconds:
        begun = time.monotonic()
        try:
            with urllib.request.urlopen(url, timeout=1.0) as reply:
                reply.read()
            latencies.append(time.monotonic() - begun)
        except OSError:
            latencies.append(None)
        table = subprocess.run(["ss", "-Htnp", "state", "established", "( sport = :%d )" % port],
                               capture_output=True, text=True, timeout=10).stdout
        held.append(sum(1 for line in table.splitlines()  # accepted: the node's process holds it
                        if " %s:" % stranger_address in line and "users:" in line))
        time.sleep(max(0.0, 0.25 - (time.monotonic() - begun)))
    return {"latencies": latencies, "held": held}


if __name__ == "__main__":
    if sys.argv[1] == "stranger":
        result = stranger(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]),
                          float(sys.argv[6]), int(sys.argv[7]) if len(sys.argv) > 7 else 0)
    else:
        result = owner(int(sys.argv[2]), sys.argv[3], float(sys.argv[4]))
    print(json.dumps(result))
