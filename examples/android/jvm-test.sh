#!/usr/bin/env bash
# Tests of the Android demo app's plain-JVM core (examples/android/edgelm-core: WordPiece tokenizer, manifest
# and checksum reading, golden comparison, the results JSON) with the JDK alone: no Android SDK, no Gradle,
# no Maven download. Needs javac (Debian: default-jdk-headless) and edgelm installed (it prepares the inputs:
# Hugging Face token ids for every SST-2 dev sentence, and a tiny android bundle).
#   examples/android/jvm-test.sh            (../shared/data beside the checkout for the SST-2 and MRPC cases)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
PY="${PYTHON:-python3}"
if ! command -v javac >/dev/null 2>&1; then
    echo "jvm-test.sh: javac not found: install a JDK 17+ (Debian: apt-get install default-jdk-headless)" >&2
    exit 2
fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$PY" "$HERE/tools/prepare_jvm_tests.py" "$WORK" ${EDGELM_DATA_DIR:+--data-dir "$EDGELM_DATA_DIR"}
mkdir -p "$WORK/classes"
javac -encoding UTF-8 -Xlint:unchecked -d "$WORK/classes" \
    $(find "$HERE/edgelm-core/src/main/java" "$HERE/edgelm-core/src/test/java" -name '*.java')
java -cp "$WORK/classes" dev.edgelm.core.CoreTests --tokens "$WORK/tokens" \
    --bundle "$WORK/dist/pixel8/android/edgelm" --work "$WORK/out"
"$PY" "$HERE/tools/check_results.py" "$WORK/dist/pixel8" "$WORK/out/results.json"
