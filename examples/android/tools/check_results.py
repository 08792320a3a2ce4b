"""The Python side of the results contract: read the results JSON the JVM core wrote (as the phone's app
does) with `edgelm validate --runner adb`'s reader, and check that edgelm reaches the same verdicts.

    python check_results.py BUNDLE RESULTS_JSON
    python check_results.py --generative BUNDLE RESULTS_JSON

BUNDLE is the export bundle (dist/pixel8); the JVM test's replay runner answered the ONNX artifact with
negated logits and every other artifact with the reference, so ONNX must fail its golden check and the
others pass. With --generative (a text-generation bundle) the replay decoder drifted from the reference on
all but 4 of the 32 golden prompts: edgelm must read the same token agreement, mean prefix and perplexity
ratio as the JVM core computed and fail the artifact on agreement, as the JVM did. Exit 0 when they agree.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path


def read_as_edgelm(bundle, results: dict, names: list[str]) -> dict:
    """The validation record `edgelm validate --runner adb` makes of ``results`` for ``names``."""
    from edgelm.validate.bundle import ResultStore, evaluate
    from edgelm.validate.runners import parse_device_results

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
        return evaluate(bundle, Path(tmp))


def generative(bundle, results: dict) -> int:
    entry = results["artifacts"][0]
    name, jvm = entry["artifact"], entry["golden"]
    a = read_as_edgelm(bundle, results, [name])["artifacts"][name]
    fid = a["fidelity"]
    print(
        f"check_results: {name}: edgelm {a['status']} ({a['checks']['golden']['detail']}); the JVM said {jvm['detail']}"
    )
    ok = a["status"] == "failed" and jvm["passed"] is False and "token agreement" in jvm["detail"]
    for key in ("token_agreement", "mean_prefix", "perplexity_ratio"):
        same = abs(fid[key] - jvm[key]) < 1e-6
        print(f"check_results: {key}: edgelm {fid[key]:.6f}, JVM {jvm[key]:.6f}" + ("" if same else "  DIFFERENT"))
        ok &= same
    ok &= a["speed"]["decode_tokens_per_s"] > 0 and a["next_token"]["top1_agreement"] is not None
    tok = results.get("tokenization") or {}
    ok &= tok.get("mismatched") == 0 and tok.get("decode_mismatched") == 0 and tok.get("rows", 0) > 32
    print(f"check_results: on-device byte-level BPE over the bundle's tokenizer cases: {tok.get('by_corpus')}")
    print("check_results: " + ("OK, edgelm and the JVM core agree (generation)" if ok else "FAILED"))
    return 0 if ok else 1


def main() -> int:
    from edgelm.bundle import Bundle

    args = sys.argv[1:]
    gen = args[:1] == ["--generative"]
    args = args[1:] if gen else args
    bundle, results = Bundle.load(args[0]), json.loads(Path(args[1]).read_text())
    if gen:
        return generative(bundle, results)
    names = bundle.artifact_names
    record = read_as_edgelm(bundle, results, names)
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
