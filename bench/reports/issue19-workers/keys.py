import sys, re, collections
KEYS = [("model call (_structured incl. HTTP)", "_structured ("), ("  SDK AsyncAPIClient.post", "AsyncAPIClient.post"), ("  aiohttp request", "ClientSession._request"),
        ("Redis claims (_claim)", "Pipeline._claim"), ("Kafka produce (Sender._send_produce_req)", "Sender._send_produce_req"),
        ("Pipeline._send", "Pipeline._send"), ("consumer thread (WorkerThread.run)", "WorkerThread.run"),
        ("Faust stream iteration (Stream._c_aiter)", "Stream._c_aiter"), ("per-stage log line (Logger.info)", "Logger.info"),
        ("pydantic (any frame in pydantic/)", "pydantic/"), ("health sampler (watch_faust.sample)", "watch_faust.<locals>.sample"),
        ("trace ids (child_of)", "child_of"), ("murmur2", "murmur2"), ("prometheus labels()", "MetricWrapperBase.labels"),
        ("socket writes (_SelectorSocketTransport.write)", "_SelectorSocketTransport.write"), ("epoll select (idle/ready wait)", "EpollSelector.select")]
def load(path):
    tot = 0; busy = 0; c = collections.Counter()
    for line in open(path):
        stack, n = line.rstrip().rsplit(' ', 1); n = int(n); tot += n
        idle = stack.split(';')[-1].startswith('select (') or 'EpollSelector.select' in stack.split(';')[-1]
        if not idle: busy += n
        for label, k in KEYS:
            if k in stack and (not idle or k == "EpollSelector.select"): c[label] += n
    return tot, busy, c
files = sys.argv[1:]
data = [load(f) for f in files]
print(f"{'':52}" + "".join(f"{f.split('/')[-1][:22]:>24}" for f in files))
print(f"{'samples (all / not in epoll)':52}" + "".join(f"{f'{t} / {b}':>24}" for t, b, _ in data))
for label, _ in KEYS:
    print(f"{label:52}" + "".join(f"{100*c[label]/(b if label[0] != 'e' else t):>23.1f}%" for t, b, c in data))
