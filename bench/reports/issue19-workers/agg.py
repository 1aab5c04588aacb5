import sys, collections, re
path = sys.argv[1]; top = int(sys.argv[2]) if len(sys.argv) > 2 else 30
selfc = collections.Counter(); incl = collections.Counter(); pkg = collections.Counter(); total = 0
def pk(fr):
    m = re.search(r'\((.*?):\d+\)', fr)
    f = m.group(1) if m else fr
    m2 = re.search(r'site-packages/([^/]+)', f)
    if m2: return m2.group(1)
    if 'python3.11' in f: return 'stdlib:' + f.rsplit('/',1)[-1]
    return f.rsplit('/', 2)[-2] + '/' + f.rsplit('/',1)[-1] if '/' in f else f
for line in open(path):
    line = line.rstrip()
    if not line: continue
    stack, n = line.rsplit(' ', 1); n = int(n); total += n
    frames = stack.split(';')
    # drop thread/process frames
    leaf = re.sub(r':\d+\)', ')', frames[-1])
    selfc[leaf] += n; pkg[pk(frames[-1])] += n
    seen = set()
    for fr in frames:
        f = re.sub(r':\d+\)', ')', fr)
        if f not in seen: seen.add(f); incl[f] += n
print('total samples', total)
print('--- self by package/file'); [print(f'{100*c/total:5.1f}% {k}') for k, c in pkg.most_common(top)]
print('--- self by function'); [print(f'{100*c/total:5.1f}% {k}') for k, c in selfc.most_common(top)]
print('--- inclusive'); [print(f'{100*c/total:5.1f}% {k}') for k, c in incl.most_common(top*2)]
