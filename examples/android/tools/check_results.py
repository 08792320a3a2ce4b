"""The Python side of the results contract: read the results JSON the JVM core wrote (as the phone's app
does) with `edgelm validate --runner adb`'s reader, and check that edgelm reaches the same verdicts.

    python check_results.py BUNDLE RESULTS_JSON

BUNDLE is the export bundle (dist/pixel8); the JVM test's replay runner answered the ONNX artifact with
negated logits and every other artifact with the reference, so ONNX must fail its golden check and the
others pass. Exit 0 when they do.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path


def main() -> int:
    from edgelm.bundle import Bundle
    from edgelm.validate.bundle import ResultStore, evaluate
    from edgelm.validate.runners import parse_device_results

    bundle, results = Bundle.load(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    names = bundle.artifact_names
    with tempfile.TemporaryDirectory() as tmp:
        store = ResultStore(Path(tmp))
        for run in parse_device_results(results, names):
            store.save(run)
        first = results["artifacts"][0]
        (Path(tmp) / "runner.json").write_text(
            json.dumps(
                {
                    "runner": "adb",
                    "kind": "adb",
                    "emulated": False,
                    "artifacts": names,
                    "warmup": first["warmup"],
                    "runs": first["runs"],
                }
            )
        )
        record = evaluate(bundle, Path(tmp))
    ok = True
    for name, a in record["artifacts"].items():
        want = "failed" if name.endswith(".onnx") else "passed"
        golden = a["checks"].get("golden", {})
        print(
            f"check_results: {name}: {a['status']} (golden: {golden.get('detail')}); the JVM said "
            f"{next(e['golden']['detail'] for e in results['artifacts'] if e['artifact'] == name)}"
        )
        ok &= a["status"] == want and a.get("eval", {}).get("rows") == len(bundle.golden["texts"])
    tok = results.get("tokenization") or {}
    ok &= tok.get("mismatched") == 0 and tok.get("rows", 0) > 0
    print(f"check_results: on-device tokenization of the golden texts: {tok}")
    print("check_results: " + ("OK, edgelm and the JVM core agree" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
