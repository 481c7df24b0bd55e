#!/usr/bin/env python3
"""run_fuzz.py — schemathesis against a live duet-coordinator, driven by docs/openapi.yaml.

Why: hand-written tests only try the inputs we thought of; a property-based fuzzer generates
bodies from the API document (valid and invalid) and checks every answer: no 5xx, status codes,
content types, headers and bodies as documented. A bounded run (fixed seed, a fixed number of
examples per operation, a time budget) keeps CI time known. One CPU worker + the coordinator on
the tiny model with a short context (--max-seq-len 128) so generations stay small. A missing
schemathesis is a failure (tools/requirements-ci.txt pins it), never a skip.

  run_fuzz.py WORKER COORDINATOR MODEL_DIR OPENAPI_YAML
"""
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "http"))
SPEC = os.path.abspath(sys.argv[4])
sys.argv = [sys.argv[0], "fuzz"] + sys.argv[1:4]
import test_http as T  # noqa: E402

EXAMPLES = os.environ.get("DUET_FUZZ_EXAMPLES", "40")
BUDGET = os.environ.get("DUET_FUZZ_SECONDS", "100")


def main():
    try:
        import schemathesis  # noqa: F401
    except ImportError:
        print("FAIL: schemathesis is missing: pip install -r tools/requirements-ci.txt")
        sys.exit(1)
    t0 = time.monotonic()
    rc = 1
    try:
        _, c, port, _ = T.start_cluster(["--fold-prompt-ids", "--max-seq-len", "128"])
        cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file",
               os.path.join(HERE, "schemathesis.toml"), "run", SPEC, "--url", "http://127.0.0.1:%d" % port,
               "--checks", "not_a_server_error,status_code_conformance,"
               "content_type_conformance,response_schema_conformance,"
               "response_headers_conformance",
               "--phases", "examples,coverage,fuzzing", "--max-examples", EXAMPLES,
               "--seed", "20250731", "--workers", "1", "--max-time", BUDGET,
               "--request-timeout", "60", "--generation-deterministic",
               "--suppress-health-check", "all", "--no-color",
               "--report", "junit", "--report-dir", T.TMP]
        print(" ".join(cmd), flush=True)
        r = subprocess.run(cmd, cwd=T.TMP, timeout=int(BUDGET) + 120)
        rc = r.returncode
        st_code, j, _, _ = T.req(port, "GET", "/health")
        T.check(st_code == 200, "the server still answers after the fuzz run")
        T.check(c.p.poll() is None, "the coordinator did not crash")
        c.stop_clean()
    finally:
        for p in T.PROCS:
            p.kill()
    print("schemathesis run: %.1f s, exit %d" % (time.monotonic() - t0, rc))
    if rc != 0 or T.FAILS:
        sys.exit(1)
    print("ok")


if __name__ == "__main__":
    main()
