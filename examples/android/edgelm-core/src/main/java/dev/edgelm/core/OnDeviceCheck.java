package dev.edgelm.core;

import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * The on-device accuracy check of an edgelm Android bundle, runtime-independent: for each artifact, verify
 * its sha256, open it (through an {@link Opener} the app provides for ExecuTorch, LiteRT or ONNX Runtime),
 * run every golden input, compare with the PyTorch fp32 reference under the artifact's tolerance, run the
 * eval set (a given .npz, or else the golden texts tokenized here: the end-to-end path, scored against the
 * labels), and time {@code runs} calls after {@code warmup} on the timing input; each row's latency is kept
 * (per-sentence latency at real lengths) and, for an early-exit cascade ({@link EarlyExitCascade}, opened by
 * the app's opener), the layer whose exit answered each row. It also tokenizes
 * the golden texts with {@link WordPieceTokenizer} and counts rows whose ids differ from the exported ones.
 *
 * <p>{@link #results} builds the JSON that {@code edgelm validate --runner adb} reads (schema
 * {@value #RESULTS_SCHEMA}; edgelm/validate/runners.py, DEVICE_RESULTS_SCHEMA).
 */
public final class OnDeviceCheck {
    public static final String RESULTS_SCHEMA = "edgelm-device-results/1";

    /** Opens an artifact file in its runtime with {@code threads} CPU threads. */
    public interface Opener {
        ModelRunner open(BundleManifest.Artifact artifact, Path file, int threads) throws Exception;
    }

    /** Peak resident memory of this process in MB (NaN when the platform cannot say). */
    public interface MemoryProbe {
        double peakRssMb();
    }

    public final Path dir;
    public final BundleManifest manifest;
    public final Golden golden;
    public final WordPieceTokenizer tokenizer;

    /** Load a bundle directory (manifest.json, golden set, vocabulary). @throws IOException unreadable files */
    public OnDeviceCheck(Path dir) throws IOException {
        this.dir = dir;
        this.manifest = BundleManifest.load(dir);
        this.golden = Golden.load(dir.resolve(manifest.goldenFile));
        this.tokenizer = WordPieceTokenizer.load(dir, manifest.tokenizer);
    }

    /** Run one artifact; never throws: a failure becomes the entry's "error". */
    public Map<String, Object> run(BundleManifest.Artifact a, Opener opener, int threads, int warmup, int runs,
                                   Path evalFile, MemoryProbe memory) {
        Map<String, Object> e = OnDeviceCheck.newEntry(a);
        try {
            manifest.checkArtifact(dir, a);
            long t0 = System.nanoTime();
            try (ModelRunner runner = opener.open(a, dir.resolve(a.file), threads)) {
                if (a.cascade != null && !(runner instanceof EarlyExitCascade))
                    throw new IllegalStateException(a.file + " is an early-exit cascade; the opener must return an EarlyExitCascade");
                e.put("load_ms", (System.nanoTime() - t0) / 1e6);
                e.put("runtime", runner.versions());
                long[][] timing = Golden.trimmed(golden.latencyIds.longRow(0), golden.latencyMask.longRow(0));
                // warm up before the golden rows, whose per-row times are kept too (as edgelm's host runner does)
                for (int k = 0; k < warmup; k++) runner.run(timing[0], timing[1]);
                Rows rows = runAll(runner, golden.inputIds, golden.attentionMask);
                e.put("outputs", rows.outputs);
                e.put("golden", golden.compare(rows.outputs, a, manifest.isClassifier()));
                rows.put(e, "");
                e.put("eval_outputs", null);
                if (evalFile != null) {
                    Map<String, Npz.Array> ev = Npz.read(evalFile);
                    Rows eo = ev.containsKey("input_ids") ? runAll(runner, ev.get("input_ids"), ev.get("attention_mask"))
                            : runTexts(runner, ev.get("texts").strings);
                    e.put("eval_outputs", eo.outputs);
                    eo.put(e, "eval_");
                    if (ev.containsKey("labels") && manifest.isClassifier())
                        e.put("eval", evalSummary(evalFile.getFileName().toString(), eo.outputs, ev.get("labels").longs));
                } else if (golden.texts != null && golden.labels != null && manifest.isClassifier()) {
                    // the bundle's eval set: the golden texts and labels, tokenized here, end to end
                    e.put("eval", evalSummary("golden texts, tokenized on the device", runTexts(runner, golden.texts).outputs, golden.labels));
                }
                List<Double> samples = new ArrayList<>();
                for (int k = 0; k < runs; k++) {
                    long t = System.nanoTime();
                    runner.run(timing[0], timing[1]);
                    samples.add((System.nanoTime() - t) / 1e6);
                }
                e.put("threads", threads);
                e.put("warmup", warmup);
                e.put("runs", runs);
                e.put("latency_seq_len", timing[0].length);
                e.put("latency_samples_ms", samples);
                e.put("peak_rss_mb", memory == null ? null : memory.peakRssMb());
            }
        } catch (Exception ex) {
            e.put("error", OnDeviceCheck.describe(ex));
        }
        return e;
    }

    /** A results entry for artifact {@code a}: its file and format, no error yet. */
    static Map<String, Object> newEntry(BundleManifest.Artifact a) {
        Map<String, Object> e = new LinkedHashMap<>();
        e.put("artifact", a.file);
        e.put("format", a.format);
        e.put("error", null);
        return e;
    }

    /** How a failure reads in the results JSON: the exception's class and message. */
    static String describe(Exception ex) {
        return ex.getClass().getSimpleName() + ": " + ex.getMessage();
    }

    private static Map<String, Object> evalSummary(String source, float[][] outputs, long[] labels) {
        Map<String, Object> m = new LinkedHashMap<>();
        m.put("source", source);
        m.put("rows", outputs.length);
        m.put("accuracy", Golden.accuracy(outputs, labels));
        return m;
    }

    /**
     * Rows run one at a time at their real lengths: the output rows, each row's latency (ms, the model call
     * only) and, for an early-exit cascade, the encoder layer whose exit answered it (else null).
     */
    public static final class Rows {
        public final float[][] outputs;
        public final List<Double> latencyMs = new ArrayList<>();
        public final List<Integer> exitLayers;

        Rows(int n, boolean cascade) {
            outputs = new float[n][];
            exitLayers = cascade ? new ArrayList<>() : null;
        }

        void run(ModelRunner runner, int r, long[][] row) throws Exception {
            long t = System.nanoTime();
            outputs[r] = runner.run(row[0], row[1]);
            latencyMs.add((System.nanoTime() - t) / 1e6);
            if (exitLayers != null) exitLayers.add(((EarlyExitCascade) runner).lastExitLayer());
        }

        /** The keys edgelm reads per row ({@code row_latency_ms}, {@code exit_layers}), {@code prefix}ed. */
        void put(Map<String, Object> e, String prefix) {
            e.put(prefix + "row_latency_ms", latencyMs);
            e.put(prefix + "exit_layers", exitLayers);
        }
    }

    private static Rows runAll(ModelRunner runner, Npz.Array ids, Npz.Array mask) throws Exception {
        Rows out = new Rows(ids.rows(), runner instanceof EarlyExitCascade);
        for (int r = 0; r < out.outputs.length; r++) out.run(runner, r, Golden.trimmed(ids.longRow(r), mask.longRow(r)));
        return out;
    }

    /** Tokenize texts on the device and run them (the end-to-end path the app takes). */
    public Rows runTexts(ModelRunner runner, String[] texts) throws Exception {
        Rows out = new Rows(texts.length, runner instanceof EarlyExitCascade);
        for (int r = 0; r < texts.length; r++) {
            WordPieceTokenizer.Encoding enc = tokenizer.encode(texts[r]);
            out.run(runner, r, Golden.trimmed(enc.inputIds, enc.attentionMask));
        }
        return out;
    }

    /**
     * Tokenize the golden texts here and compare with the exported token ids (single-text rows only: a row
     * with two [SEP] is a text pair, whose second text the golden set does not keep).
     * @return {"rows": compared, "mismatched": count, "first_mismatch": index or null}
     */
    public Map<String, Object> tokenizationCheck() {
        Map<String, Object> m = new LinkedHashMap<>();
        if (golden.texts == null) {
            m.put("rows", 0);
            return m;
        }
        long sep = tokenizer.encode("").inputIds[1];
        int rows = 0, mismatched = 0;
        Integer first = null;
        for (int r = 0; r < golden.texts.length; r++) {
            long[] want = golden.inputIds.longRow(r);
            if (Arrays.stream(want).filter(x -> x == sep).count() != 1) continue;
            rows++;
            long[] got = tokenizer.encode(golden.texts[r]).inputIds;
            if (!Arrays.equals(got, want)) {
                mismatched++;
                if (first == null) first = r;
            }
        }
        m.put("rows", rows);
        m.put("mismatched", mismatched);
        m.put("first_mismatch", first);
        return m;
    }

    /** The results document: {"schema", "device", "bundle", "tokenization", "artifacts": [entries]}. */
    public Map<String, Object> results(Map<String, Object> device, List<Map<String, Object>> entries) {
        Map<String, Object> doc = new LinkedHashMap<>();
        doc.put("schema", RESULTS_SCHEMA);
        doc.put("device", device);
        doc.put("bundle", manifest.device);
        doc.put("tokenization", tokenizationCheck());
        doc.put("artifacts", entries);
        return doc;
    }

    /** Write a results document as JSON (to a temp file, then renamed into place). */
    public static void write(Map<String, Object> doc, Path out) throws IOException {
        Path tmp = out.resolveSibling(out.getFileName() + ".tmp");
        Files.write(tmp, Json.write(doc).getBytes(java.nio.charset.StandardCharsets.UTF_8));
        Files.move(tmp, out, java.nio.file.StandardCopyOption.REPLACE_EXISTING, java.nio.file.StandardCopyOption.ATOMIC_MOVE);
    }
}
