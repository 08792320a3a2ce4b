package dev.edgelm.core;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * Tests of the plain-JVM core with no test framework (none can be downloaded here): run by
 * examples/android/jvm-test.sh, which prepares their inputs with edgelm and Hugging Face tokenizers.
 *
 * <pre>java dev.edgelm.core.CoreTests --tokens DIR --bundle DIR --bpe DIR --gen-bundle DIR --ee-bundle DIR
 *     --ee-replay FILE --work DIR</pre>
 *
 * --tokens: vocab.txt, settings.json (an android manifest's tokenizer object) and tokens.tsv (per line: text,
 * pair or empty, max_length, the ids Hugging Face gives, comma-separated). --bundle: an android bundle from
 * `edgelm export --bundle android`. --bpe: one folder per byte-level BPE tokenizer, each with tokenizer.json
 * and cases.jsonl (per line {"corpus", "text", "ids"}: Hugging Face's ids). --gen-bundle: the android bundle of
 * a text-generation export. --ee-bundle: the android bundle of an early-exit classifier, --ee-replay: its
 * segments' outputs on the golden rows (see EarlyExitTests). --work: scratch space; results.json,
 * gen-results.json and ee-results.json are written there for the Python side.
 */
public final class CoreTests {
    private static int failures = 0, passes = 0;

    static void check(boolean ok, String what) {
        if (ok) passes++;
        else {
            failures++;
            System.out.println("FAIL " + what);
        }
    }

    public static void main(String[] args) throws Exception {
        Map<String, String> opt = new HashMap<>();
        for (int k = 0; k + 1 < args.length; k += 2) opt.put(args[k], args[k + 1]);
        Path tokens = Paths.get(opt.get("--tokens")), bundle = Paths.get(opt.get("--bundle")), work = Paths.get(opt.get("--work"));
        Path bpe = Paths.get(opt.get("--bpe")), genBundle = Paths.get(opt.get("--gen-bundle"));
        Path eeBundle = Paths.get(opt.get("--ee-bundle")), eeReplay = Paths.get(opt.get("--ee-replay"));
        Files.createDirectories(work);
        run("json", CoreTests::testJson);
        run("tokenizer parity with Hugging Face", () -> testTokenizer(tokens));
        run("manifest parsing", () -> testManifest(bundle));
        run("checksum failure detected", () -> testChecksums(bundle, work));
        run("golden comparison", () -> testGolden(bundle));
        run("on-device check and results JSON", () -> testOnDeviceCheck(bundle, work));
        run("byte-level BPE parity with Hugging Face", () -> testByteLevelBpe(bpe));
        run("greedy generation, perplexity and agreement scoring", GenerationTests::testScoring);
        run("generative bundle manifest and checksums", () -> GenerationTests.testManifest(genBundle, work));
        run("generative on-device check and results JSON", () -> GenerationTests.testCheck(genBundle, work));
        run("early-exit confidence and threshold rule", EarlyExitTests::testConfidence);
        run("early-exit cascades: hand-off, exits, on-device check", () -> EarlyExitTests.testBundle(eeBundle, eeReplay, work));
        System.out.println((failures == 0 ? "OK " : "FAILED ") + passes + " checks passed, " + failures + " failed");
        System.exit(failures == 0 ? 0 : 1);
    }

    interface Body {
        void run() throws Exception;
    }

    private static void run(String name, Body body) {
        int before = failures;
        try {
            body.run();
        } catch (Exception | AssertionError e) {
            failures++;
            System.out.println("FAIL " + name + ": " + e);
            e.printStackTrace(System.out);
        }
        System.out.println((failures == before ? "PASS " : "FAIL ") + name);
    }

    static void testByteLevelBpe(Path root) throws IOException {
        List<Path> dirs = new ArrayList<>();
        try (java.util.stream.Stream<Path> st = Files.list(root)) {
            st.filter(d -> Files.isRegularFile(d.resolve("tokenizer.json"))).sorted().forEach(dirs::add);
        }
        check(!dirs.isEmpty(), "byte-level BPE tokenizers to compare in " + root);
        for (Path d : dirs) {
            ByteLevelBpeTokenizer t = ByteLevelBpeTokenizer.load(d.resolve("tokenizer.json"));
            Map<String, int[]> counts = new LinkedHashMap<>(); // corpus -> {texts, encode differs, decode differs}
            int shown = 0;
            for (String line : Files.readAllLines(d.resolve("cases.jsonl"), StandardCharsets.UTF_8)) {
                Map<String, Object> c = Json.obj(Json.parse(line), "case");
                String text = Json.str(c, "text");
                List<Object> w = Json.arr(c.get("ids"), "ids");
                int[] want = new int[w.size()];
                for (int k = 0; k < want.length; k++) want[k] = ((Number) w.get(k)).intValue();
                int[] got = t.encode(text);
                String back = t.decode(want);
                StringBuilder streamed = new StringBuilder();
                ByteLevelBpeTokenizer.StreamDecoder sd = t.streamDecoder();
                for (int id : want) streamed.append(sd.push(id));
                streamed.append(sd.flush());
                int[] n = counts.computeIfAbsent(Json.str(c, "corpus"), k -> new int[3]);
                n[0]++;
                if (!Arrays.equals(got, want)) n[1]++;
                if (!back.equals(text) || !streamed.toString().equals(text)) n[2]++;
                if ((!Arrays.equals(got, want) || !back.equals(text)) && shown++ < 3)
                    System.out.println("  differs: " + text.substring(0, Math.min(60, text.length())) + " want "
                            + Arrays.toString(want) + " got " + Arrays.toString(got));
            }
            int texts = 0, enc = 0, dec = 0;
            StringBuilder per = new StringBuilder();
            for (Map.Entry<String, int[]> e : counts.entrySet()) {
                texts += e.getValue()[0];
                enc += e.getValue()[1];
                dec += e.getValue()[2];
                per.append(per.length() == 0 ? "" : ", ").append(e.getKey()).append(' ').append(e.getValue()[0]);
            }
            System.out.println("  " + d.getFileName() + ": " + texts + " texts (" + per + "): encode differs " + enc
                    + ", decode differs " + dec);
            check(texts > 0 && enc == 0 && dec == 0, d.getFileName() + ": byte-level BPE equal to Hugging Face on every text");
        }
    }

    static void testJson() {
        Object v = Json.parse("{\"a\": [1, 2.5, -3e2, true, null, \"x\\\"y\\u00e9\\n\"], \"b\": {}}");
        Map<String, Object> m = Json.obj(v, "doc");
        List<Object> a = Json.arr(m.get("a"), "a");
        check(a.get(0).equals(1L) && a.get(1).equals(2.5) && a.get(2).equals(-300.0), "json numbers " + a);
        check(a.get(3).equals(true) && a.get(4) == null && a.get(5).equals("x\"y\u00e9\n"), "json literals and escapes");
        check(Json.parse(Json.write(m)).equals(m), "json round trip");
        check(Json.write(new float[] {1.5f, Float.NaN}).equals("[1.5,null]"), "json float array with NaN");
        for (String bad : new String[] {"{", "{\"a\" 1}", "[1,]", "tru", "{\"a\":1} x"}) {
            boolean threw = false;
            try {
                Json.parse(bad);
            } catch (IllegalArgumentException e) {
                threw = e.getMessage().contains("offset");
            }
            check(threw, "malformed JSON refused: " + bad);
        }
    }

    @SuppressWarnings("unchecked")
    static void testTokenizer(Path dir) throws IOException {
        Map<String, Object> settings = Json.obj(Json.parse(Files.readString(dir.resolve("settings.json"))), "settings");
        List<String> vocab = Files.readAllLines(dir.resolve("vocab.txt"), StandardCharsets.UTF_8);
        Map<Integer, WordPieceTokenizer> byLength = new HashMap<>();
        int lines = 0, mismatches = 0;
        for (String line : Files.readAllLines(dir.resolve("tokens.tsv"), StandardCharsets.UTF_8)) {
            String[] f = line.split("\t", -1);
            String text = unescape(f[0]), pair = f[1].isEmpty() ? null : unescape(f[1]);
            int maxLen = Integer.parseInt(f[2]);
            WordPieceTokenizer tok = byLength.computeIfAbsent(maxLen, n -> {
                Map<String, Object> s = new LinkedHashMap<>(settings);
                s.put("max_length", (long) n);
                return new WordPieceTokenizer(vocab, s);
            });
            long[] want = Arrays.stream(f[3].split(",")).mapToLong(Long::parseLong).toArray();
            WordPieceTokenizer.Encoding enc = tok.encode(text, pair);
            lines++;
            if (!Arrays.equals(enc.inputIds, want)) {
                mismatches++;
                if (mismatches <= 5)
                    System.out.println("  token ids differ for " + text + (pair == null ? "" : " | " + pair) + "\n    hf:   "
                            + Arrays.toString(want) + "\n    jvm:  " + Arrays.toString(enc.inputIds));
            }
            long realTokens = Arrays.stream(enc.attentionMask).sum();
            check(realTokens == enc.length && enc.inputIds.length == maxLen, "mask and padding for " + text);
        }
        System.out.println("  " + lines + " texts compared with Hugging Face tokenizers, " + mismatches + " differ");
        check(lines > 0 && mismatches == 0, "token ids identical to Hugging Face on every line (" + mismatches + " of " + lines + " differ)");
    }

    private static String unescape(String s) {
        StringBuilder b = new StringBuilder();
        for (int k = 0; k < s.length(); k++) {
            char c = s.charAt(k);
            if (c == '\\' && k + 1 < s.length()) {
                char n = s.charAt(++k);
                if (n == 't') b.append('\t');
                else if (n == 'n') b.append('\n');
                else if (n == 'r') b.append('\r');
                else if (n == 'u') {
                    b.append((char) Integer.parseInt(s.substring(k + 1, k + 5), 16));
                    k += 4;
                } else b.append(n);
            } else b.append(c);
        }
        return b.toString();
    }

    static void testManifest(Path bundle) throws IOException {
        BundleManifest m = BundleManifest.load(bundle);
        check(m.isClassifier() && m.labels.equals(List.of("negative", "positive")), "kind and labels " + m.kind + " " + m.labels);
        check(m.output.equals("logits") && m.goldenFile.equals("golden.npz") && m.threads >= 1, "output, golden, threads");
        List<String> runtimes = new ArrayList<>();
        for (BundleManifest.Artifact a : m.artifacts) runtimes.add(a.runtime);
        check(runtimes.contains("litert") && runtimes.contains("onnxruntime"), "runtimes " + runtimes);
        for (BundleManifest.Artifact a : m.artifacts) {
            check(a.sha256.length() == 64 && a.sizeBytes == Files.size(bundle.resolve(a.file)), a.file + " sha256 and size");
            // a classifier is judged by top-1 and accuracy drop, not by the cosine of its logits
            check(Double.isNaN(a.minCosine) && a.maxAbsError > 0 && a.minTop1 > 0, a.file + " tolerance " + a.minCosine + " " + a.maxAbsError);
            if (a.runtime.equals("litert"))
                check(a.inputDtype.equals("int32") && !a.seqBuckets.isEmpty() && a.seqBuckets.get(a.seqBuckets.size() - 1) == a.maxSeqLen,
                        "LiteRT int32 inputs and buckets " + a.seqBuckets);
            else check(a.inputDtype.equals("int64") && a.seqBuckets.isEmpty(), a.file + " int64 inputs");
        }
        check(((Number) m.tokenizer.get("max_length")).intValue() == m.artifacts.get(0).maxSeqLen, "tokenizer max_length");
        String text = Files.readString(bundle.resolve("manifest.json"));
        boolean threw = false;
        try {
            BundleManifest.parse(text.replace("edgelm-android-bundle/1", "edgelm-android-bundle/9"));
        } catch (IllegalArgumentException e) {
            threw = e.getMessage().contains("not an edgelm Android bundle manifest");
        }
        check(threw, "another schema refused");
        threw = false;
        try {
            BundleManifest.parse(text.substring(0, text.length() / 2));
        } catch (IllegalArgumentException e) {
            threw = e.getMessage().contains("malformed JSON");
        }
        check(threw, "truncated manifest refused");
    }

    static void testChecksums(Path bundle, Path work) throws IOException {
        BundleManifest m = BundleManifest.load(bundle);
        check(m.verify(bundle).isEmpty(), "a fresh bundle verifies: " + m.verify(bundle));
        Path copy = work.resolve("tampered");
        Files.createDirectories(copy);
        try (var files = Files.list(bundle)) {
            for (Path p : (Iterable<Path>) files::iterator) Files.copy(p, copy.resolve(p.getFileName()), java.nio.file.StandardCopyOption.REPLACE_EXISTING);
        }
        String victim = m.artifacts.get(0).file;
        byte[] b = Files.readAllBytes(copy.resolve(victim));
        b[b.length / 2] ^= 0x01; // one bit
        Files.write(copy.resolve(victim), b);
        Files.delete(copy.resolve("vocab.txt"));
        List<String> problems = m.verify(copy);
        check(problems.size() == 2, "two problems reported: " + problems);
        check(problems.stream().anyMatch(p -> p.startsWith(victim + ": sha256")), "flipped bit in " + victim + " detected");
        check(problems.contains("vocab.txt: missing"), "missing vocabulary detected");
    }

    static void testGolden(Path bundle) throws IOException {
        BundleManifest m = BundleManifest.load(bundle);
        Golden g = Golden.load(bundle.resolve(m.goldenFile));
        BundleManifest.Artifact a = m.artifacts.get(0);
        float[][] ref = g.references.get(a.goldenReference).floatRows();
        check(g.size() == ref.length && g.texts != null && g.labels != null && g.labels.length == ref.length, "golden arrays");
        Map<String, Object> same = g.compare(ref, a, true);
        check((Boolean) same.get("passed") && (Double) same.get("max_abs_error") == 0.0
                && Math.abs((Double) same.get("cosine_mean") - 1.0) < 1e-9, "reference against itself: " + same);
        float[][] near = copy(ref);
        for (float[] row : near) for (int k = 0; k < row.length; k++) row[k] += (float) (0.1 * a.maxAbsError) * Math.signum(row[k]);
        check((Boolean) g.compare(near, a, true).get("passed"), "10% of the tolerance passes");
        float[][] far = copy(ref);
        far[0][0] += (float) (2 * a.maxAbsError + 1.0);
        Map<String, Object> f = g.compare(far, a, true);
        check(!(Boolean) f.get("passed") && ((String) f.get("detail")).contains("max error"), "twice the tolerance fails: " + f.get("detail"));
        float[][] flipped = copy(ref);
        for (float[] row : flipped) for (int k = 0; k < row.length; k++) row[k] = -row[k];
        Map<String, Object> fl = g.compare(flipped, a, true);
        check(!(Boolean) fl.get("passed") && ((String) fl.get("detail")).contains("top-1") && (Double) fl.get("top1_agreement") < 0.5,
                "negated logits fail top-1: " + fl.get("detail"));
        Map<String, Object> shape = g.compare(new float[][] {{1f}}, a, true);
        check(!(Boolean) shape.get("passed"), "wrong shape fails");
        check(Golden.accuracy(ref, g.labels) == a.referenceAccuracy || Math.abs(Golden.accuracy(ref, g.labels) - a.referenceAccuracy) < 1e-9,
                "reference accuracy equals the manifest's");
    }

    private static float[][] copy(float[][] a) {
        float[][] c = new float[a.length][];
        for (int r = 0; r < a.length; r++) c[r] = a[r].clone();
        return c;
    }

    /** A runner that answers each golden input with its reference row: stands in for a phone's runtime. */
    static final class ReplayRunner implements ModelRunner {
        final Map<String, float[]> answers = new HashMap<>();
        final float scale;

        ReplayRunner(Golden g, String ref, float scale) {
            this.scale = scale;
            float[][] rows = g.references.get(ref).floatRows();
            for (int r = 0; r < rows.length; r++) {
                long[][] t = Golden.trimmed(g.inputIds.longRow(r), g.attentionMask.longRow(r));
                answers.put(Arrays.toString(t[0]), rows[r]);
            }
        }

        @Override
        public float[] run(long[] ids, long[] mask) {
            float[] row = answers.getOrDefault(Arrays.toString(ids), answers.values().iterator().next());
            float[] out = row.clone();
            for (int k = 0; k < out.length; k++) out[k] *= scale;
            return out;
        }

        @Override
        public Map<String, String> versions() {
            return Map.of("replay", "1");
        }
    }

    static void testOnDeviceCheck(Path bundle, Path work) throws Exception {
        OnDeviceCheck c = new OnDeviceCheck(bundle);
        Map<String, Object> tok = c.tokenizationCheck();
        check(((Number) tok.get("rows")).intValue() == c.golden.size() && ((Number) tok.get("mismatched")).intValue() == 0,
                "golden texts tokenize on the JVM to the exported ids: " + tok);
        List<Map<String, Object>> entries = new ArrayList<>();
        for (BundleManifest.Artifact a : c.manifest.artifacts) {
            float scale = a.runtime.equals("onnxruntime") ? -1f : 1f; // one artifact answers wrongly
            Map<String, Object> e = c.run(a, (art, file, threads) -> new ReplayRunner(c.golden, art.goldenReference, scale),
                    2, 1, 3, null, () -> 12.5);
            check(e.get("error") == null, a.file + " ran: " + e.get("error"));
            check(((List<?>) e.get("latency_samples_ms")).size() == 3 && (Integer) e.get("runs") == 3, a.file + " latency samples");
            check(((Map<?, ?>) e.get("golden")).get("passed").equals(scale > 0), a.file + " golden verdict " + e.get("golden"));
            Map<?, ?> ev = (Map<?, ?>) e.get("eval");
            double want = scale > 0 ? Golden.accuracy(c.golden.references.get(a.goldenReference).floatRows(), c.golden.labels) : -1;
            check(ev != null && ((Number) ev.get("rows")).intValue() == c.golden.size()
                    && (scale < 0 || Math.abs(((Number) ev.get("accuracy")).doubleValue() - want) < 1e-9),
                    a.file + " golden texts tokenized on the device and scored end to end: " + ev);
            entries.add(e);
        }
        Map<String, Object> broken = c.run(c.manifest.artifacts.get(0), (art, file, threads) -> {
            throw new IllegalStateException("no such runtime on this phone");
        }, 1, 0, 1, null, null);
        check(String.valueOf(broken.get("error")).contains("no such runtime"), "a runtime failure is the entry's error");
        Map<String, Object> device = new LinkedHashMap<>();
        device.put("model", "JVM test");
        device.put("abi", System.getProperty("os.arch"));
        Map<String, Object> doc = c.results(device, entries);
        Path out = work.resolve("results.json");
        OnDeviceCheck.write(doc, out);
        Map<String, Object> back = Json.obj(Json.parse(Files.readString(out)), "results");
        check(OnDeviceCheck.RESULTS_SCHEMA.equals(back.get("schema")) && ((List<?>) back.get("artifacts")).size() == c.manifest.artifacts.size(),
                "results JSON written and readable");
    }
}
