# Generates floats.json: [{"in": JSON number text, "want": Python json.dumps of it}, ...].
# Usage: python3 gen_floats.py floats.json   (deterministic: fixed seed)
import json, random, struct, sys
rng = random.Random(20261122)
vals = []
for _ in range(400):  # random bit patterns: every exponent range
    d = struct.unpack("<d", struct.pack("<Q", rng.getrandbits(64)))[0]
    if d == d and abs(d) != float("inf"):
        vals.append(d)
for e in range(-30, 30):  # around the fixed/exponent switch points
    for m in (1.0, 1.5, 9.999999999999999, 0.1, 3.0000000000000004):
        vals.append(m * 10.0 ** e)
vals += [0.0, -0.0, 5e-324, 1.7976931348623157e308, 2.2250738585072014e-308, 1e16, 1e15, 9999999999999998.0, 0.0001, 0.00001]
cases = [{"in": repr(v), "want": json.dumps(v)} for v in vals]
json.dump(cases, open(sys.argv[1], "w"), indent=0)
print(len(cases), "floats")
