package dev.edgelm.core;

import static dev.edgelm.core.CoreTests.check;

import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * Early-exit cascades in the JVM core, against what edgelm computed in Python with the real runtimes: the
 * bundle of a tiny early-exit classifier (ONNX and TFLite cascades beside the whole models) and replay.npz,
 * each segment's outputs on each golden row (examples/android/tools/prepare_jvm_tests.py, ee_bundle).
 */
final class EarlyExitTests {
    private EarlyExitTests() {}

    /**
     * Segments answering from replay.npz. Segment 0 finds its row by the token ids; segment k &gt; 0 by the hidden
     * states it is handed, which must equal, float for float, what segment k - 1 returned for some row (the
     * hand-off); anything else throws. Counts the calls per segment.
     */
    static final class ReplaySegments {
        final Map<String, Npz.Array> npz;
        final int cascade, rows, segments;
        final Map<String, Integer> rowOfIds = new LinkedHashMap<>();
        final int[] calls;
        int closes = 0;

        ReplaySegments(Map<String, Npz.Array> npz, int cascade, Golden g, int segments) {
            this.npz = npz;
            this.cascade = cascade;
            this.rows = g.size();
            this.segments = segments;
            this.calls = new int[segments];
            for (int r = 0; r < rows; r++)
                rowOfIds.put(Arrays.toString(Golden.trimmed(g.inputIds.longRow(r), g.attentionMask.longRow(r))[0]), r);
            // the timing row is replayed as row N
            rowOfIds.putIfAbsent(Arrays.toString(Golden.trimmed(g.latencyIds.longRow(0), g.latencyMask.longRow(0))[0]), rows);
        }

        float[] get(int k, int r, String what) {
            Npz.Array a = npz.get(cascade + "_s" + k + "_r" + r + "_" + what);
            return a == null ? null : a.floats;
        }

        EarlyExitCascade.SegmentRunner segment(int k) {
            return new EarlyExitCascade.SegmentRunner() {
                @Override
                public EarlyExitCascade.Output run(long[] ids, float[] hidden, long[] mask) {
                    calls[k]++;
                    int row = -1;
                    if (k == 0) {
                        if (hidden != null) throw new IllegalStateException("segment 0 was handed hidden states");
                        Integer r = rowOfIds.get(Arrays.toString(ids));
                        if (r == null) throw new IllegalStateException("segment 0: token ids of no golden row");
                        row = r;
                    } else {
                        if (ids != null || hidden == null) throw new IllegalStateException("segment " + k + " was not handed hidden states");
                        for (int r = 0; r <= rows && row < 0; r++) if (Arrays.equals(hidden, get(k - 1, r, "hidden"))) row = r;
                        if (row < 0) throw new IllegalStateException("segment " + k + ": hidden states segment " + (k - 1) + " never returned");
                    }
                    return new EarlyExitCascade.Output(get(k, row, "hidden"), get(k, row, "logits"));
                }

                @Override
                public Map<String, String> versions() {
                    return Map.of("replay", "1");
                }

                @Override
                public void close() {
                    closes++;
                }
            };
        }

        EarlyExitCascade open(BundleManifest.Artifact a) {
            List<EarlyExitCascade.SegmentRunner> runners = new ArrayList<>();
            for (int k = 0; k < segments; k++) runners.add(segment(k));
            return new EarlyExitCascade(a.cascade, runners, a.cascade.threshold);
        }
    }

    /** The confidence measures against numbers worked by hand. */
    static void testConfidence() {
        float[] even = {0f, 0f};
        check(Math.abs(EarlyExitCascade.confidence(even, "max_prob") - 0.5) < 1e-12, "max_prob of equal logits is 0.5");
        check(Math.abs(EarlyExitCascade.confidence(even, "entropy") - Math.log(2)) < 1e-12, "entropy of equal logits is ln 2");
        float[] sure = {0f, (float) Math.log(3)}; // softmax 0.25 / 0.75
        check(Math.abs(EarlyExitCascade.confidence(sure, "max_prob") - 0.75) < 1e-7, "max_prob 0.75");
        double h = -(0.25 * Math.log(0.25) + 0.75 * Math.log(0.75));
        check(Math.abs(EarlyExitCascade.confidence(sure, "entropy") - h) < 1e-7, "entropy of 0.25 / 0.75");
        check(EarlyExitCascade.confident(0.75, "max_prob", 0.75) && !EarlyExitCascade.confident(0.74, "max_prob", 0.75),
                "max_prob exits at >= threshold");
        check(EarlyExitCascade.confident(0.3, "entropy", 0.3) && !EarlyExitCascade.confident(0.31, "entropy", 0.3),
                "entropy exits at <= threshold");
        check(!EarlyExitCascade.confident(1.0, "max_prob", EarlyExitCascade.neverExit("max_prob"))
                && !EarlyExitCascade.confident(0.0, "entropy", EarlyExitCascade.neverExit("entropy")), "never-exit thresholds");
        boolean threw = false;
        try {
            EarlyExitCascade.confidence(sure, "margin");
        } catch (IllegalArgumentException e) {
            threw = true;
        }
        check(threw, "an unknown measure is refused");
    }

    /**
     * The bundle's cascades: manifest, exits equal edgelm's at the bundle's threshold and at three others, the
     * later segment runs only for rows that did not exit, the on-device check's entry (exits, per-row latency)
     * and the results JSON for check_results.py.
     */
    static void testBundle(Path bundle, Path replayFile, Path work) throws Exception {
        OnDeviceCheck c = new OnDeviceCheck(bundle);
        Map<String, Npz.Array> npz = Npz.read(replayFile);
        String[] names = npz.get("cascades").strings;
        check(names.length == 2, "two cascades in the bundle: " + Arrays.toString(names));
        check(c.manifest.verify(bundle).isEmpty(), "the early-exit bundle verifies: " + c.manifest.verify(bundle));
        List<Map<String, Object>> entries = new ArrayList<>();
        for (int i = 0; i < names.length; i++) {
            BundleManifest.Artifact a = c.manifest.artifact(names[i]);
            BundleManifest.Cascade p = a.cascade;
            check(p != null && p.segments.size() == 2 && p.segments.get(0).lastLayer == 1 && p.segments.get(1).lastLayer == p.numLayers,
                    a.file + " policy: segments end at layers 1 and " + (p == null ? "?" : p.numLayers));
            check(a.companions.size() == 2 && a.companions.get(0)[0].equals(p.segments.get(0).file), a.file + " segments are its companions");
            check(Double.isNaN(a.maxAbsError) && a.minTop1 > 0, a.file + " judged by top-1 and accuracy, not by its logits' error");
            ReplaySegments replay = new ReplaySegments(npz, i, c.golden, p.segments.size());
            EarlyExitCascade cascade = replay.open(a);
            long[] want = npz.get(i + "_exit_layers").longs;
            int mismatched = 0, late = 0;
            for (int r = 0; r < c.golden.size(); r++) {
                long[][] row = Golden.trimmed(c.golden.inputIds.longRow(r), c.golden.attentionMask.longRow(r));
                float[] out = cascade.run(row[0], row[1]);
                if (cascade.lastExitLayer() != want[r]) mismatched++;
                if (cascade.lastExitLayer() > 1) late++;
                int seg = cascade.lastExitLayer() == 1 ? 0 : 1;
                if (!Arrays.equals(out, replay.get(seg, r, "logits"))) mismatched++;
            }
            check(mismatched == 0, a.file + ": exits and logits equal edgelm's on every golden row (" + mismatched + " differ)");
            check(replay.calls[0] == c.golden.size() && replay.calls[1] == late,
                    a.file + ": segment 2 ran only for the " + late + " rows that did not exit: " + Arrays.toString(replay.calls));
            double[] ts = toDoubles(npz.get(i + "_thresholds"));
            Npz.Array sweep = npz.get(i + "_sweep_exit_layers");
            int sweepDiff = 0;
            java.util.Set<Long> seen = new java.util.HashSet<>();
            for (int t = 0; t < ts.length; t++) {
                EarlyExitCascade at = cascade.withThreshold(ts[t]);
                long[] exp = sweep.longRow(t);
                for (int r = 0; r < c.golden.size(); r++) {
                    long[][] row = Golden.trimmed(c.golden.inputIds.longRow(r), c.golden.attentionMask.longRow(r));
                    at.run(row[0], row[1]);
                    if (at.lastExitLayer() != exp[r]) sweepDiff++;
                    seen.add((long) at.lastExitLayer());
                }
            }
            cascade.withThreshold(0.5).close();
            cascade.close();
            check(replay.closes == p.segments.size(), a.file + ": each segment closed once by a cascade and its sweep copy: " + replay.closes);
            check(sweepDiff == 0 && seen.size() == 2, a.file + ": at thresholds " + Arrays.toString(ts)
                    + " the exits equal edgelm's exit_choice (" + sweepDiff + " differ; layers taken " + seen + ")");
            Map<String, Object> e = c.run(a, (art, file, threads) -> new ReplaySegments(npz, indexOf(names, art.file),
                    c.golden, art.cascade.segments.size()).open(art), 1, 1, 3, null, () -> 10.0);
            check(e.get("error") == null, a.file + " ran in the on-device check: " + e.get("error"));
            List<?> exits = (List<?>) e.get("exit_layers"), ms = (List<?>) e.get("row_latency_ms");
            List<Long> wantList = new ArrayList<>();
            for (long x : want) wantList.add(x);
            List<Long> got = new ArrayList<>();
            if (exits != null) for (Object o : exits) got.add(((Number) o).longValue());
            check(got.equals(wantList) && ms != null && ms.size() == c.golden.size(),
                    a.file + ": the entry keeps each row's exit layer and latency");
            Object verdict = e.get("golden");
            check(verdict instanceof Map && Boolean.TRUE.equals(((Map<?, ?>) verdict).get("passed")), a.file + " golden verdict " + verdict);
            entries.add(e);
        }
        // a whole model's entry keeps per-row latency but no exits
        BundleManifest.Artifact whole = c.manifest.artifacts.stream().filter(x -> x.cascade == null).findFirst().orElseThrow();
        Map<String, Object> w = c.run(whole, (art, file, threads) -> new CoreTests.ReplayRunner(c.golden, art.goldenReference, 1f), 1, 0, 2, null, null);
        check(w.get("error") == null && w.get("exit_layers") == null && ((List<?>) w.get("row_latency_ms")).size() == c.golden.size(),
                "a whole model: per-row latency, no exits");
        entries.add(w);
        // an opener that returns a plain runner for a cascade is an error, not a silent whole-model run
        Map<String, Object> wrong = c.run(c.manifest.artifact(names[0]),
                (art, file, threads) -> new CoreTests.ReplayRunner(c.golden, "reference", 1f), 1, 0, 1, null, null);
        check(String.valueOf(wrong.get("error")).contains("must return an EarlyExitCascade"), "a cascade opened as a plain model is refused");
        Map<String, Object> device = new LinkedHashMap<>();
        device.put("model", "JVM test");
        device.put("abi", System.getProperty("os.arch"));
        OnDeviceCheck.write(c.results(device, entries), work.resolve("ee-results.json"));
    }

    private static int indexOf(String[] names, String file) {
        for (int k = 0; k < names.length; k++) if (names[k].equals(file)) return k;
        throw new IllegalArgumentException(file);
    }

    private static double[] toDoubles(Npz.Array a) {
        double[] d = new double[a.floats.length];
        for (int k = 0; k < d.length; k++) d[k] = a.floats[k];
        return d;
    }
}
