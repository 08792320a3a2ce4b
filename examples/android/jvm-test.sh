#!/usr/bin/env bash
# Tests of the Android demo app's plain-JVM core (examples/android/edgelm-core: WordPiece and byte-level BPE
# tokenizers, manifest and checksum reading, golden comparison, greedy generation and agreement scoring, the
# results JSON) with the JDK alone: no Android SDK, no Gradle, no Maven download. Needs javac (Debian:
# default-jdk-headless) and edgelm installed (it prepares the inputs: Hugging Face token ids for every SST-2
# dev sentence and WikiText-2 test line, the android bundles of a tiny classifier, a tiny causal LM and a tiny
# early-exit classifier).
#   examples/android/jvm-test.sh            (../shared/data beside the checkout for the SST-2, MRPC, WikiText-2 cases)
#   EDGELM_BPE_TOKENIZER=dist/pixel8/tokenizer.json examples/android/jvm-test.sh   (also compare that tokenizer)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
PY="${PYTHON:-python3}"
if ! command -v javac >/dev/null 2>&1; then
    echo "jvm-test.sh: javac not found: install a JDK 17+ (Debian: apt-get install default-jdk-headless)" >&2
    exit 2
fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$PY" "$HERE/tools/prepare_jvm_tests.py" "$WORK" ${EDGELM_DATA_DIR:+--data-dir "$EDGELM_DATA_DIR"} \
    ${EDGELM_BPE_TOKENIZER:+--bpe-tokenizer "$EDGELM_BPE_TOKENIZER"}
mkdir -p "$WORK/classes"
javac -encoding UTF-8 -Xlint:unchecked -d "$WORK/classes" \
    $(find "$HERE/edgelm-core/src/main/java" "$HERE/edgelm-core/src/test/java" -name '*.java')
java -cp "$WORK/classes" dev.edgelm.core.CoreTests --tokens "$WORK/tokens" \
    --bundle "$WORK/dist/pixel8/android/edgelm" --bpe "$WORK/bpe" \
    --gen-bundle "$WORK/gen/pixel8/android/edgelm" --ee-bundle "$WORK/ee/pixel8/android/edgelm" \
    --ee-replay "$WORK/ee/replay.npz" --work "$WORK/out"
"$PY" "$HERE/tools/check_results.py" "$WORK/dist/pixel8" "$WORK/out/results.json"
"$PY" "$HERE/tools/check_results.py" --generative "$WORK/gen/pixel8" "$WORK/out/gen-results.json"
"$PY" "$HERE/tools/check_results.py" --early-exit "$WORK/ee/pixel8" "$WORK/out/ee-results.json" "$WORK/ee/replay.npz"
