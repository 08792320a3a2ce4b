package dev.edgelm.core;

import java.io.IOException;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * The golden set of a bundle ({@code golden.npz}: int64 {@code input_ids}/{@code attention_mask} [N, seq],
 * float32 reference outputs [N, D] per reference name, optional int64 {@code labels} [N] and {@code texts},
 * and the timing input {@code latency_input_ids}/{@code latency_attention_mask} [1, seq]) and the comparison
 * of a runtime's outputs with it: the same metrics as edgelm's Python side (edgelm/validate/metrics.py).
 */
public final class Golden {
    public final Npz.Array inputIds, attentionMask, latencyIds, latencyMask;
    public final Map<String, Npz.Array> references = new LinkedHashMap<>();
    public final long[] labels;
    public final String[] texts;

    private Golden(Map<String, Npz.Array> a) {
        inputIds = need(a, "input_ids");
        attentionMask = need(a, "attention_mask");
        latencyIds = need(a, "latency_input_ids");
        latencyMask = need(a, "latency_attention_mask");
        for (Map.Entry<String, Npz.Array> e : a.entrySet())
            if (e.getKey().startsWith("reference")) references.put(e.getKey(), e.getValue());
        labels = a.containsKey("labels") ? a.get("labels").longs : null;
        texts = a.containsKey("texts") ? a.get("texts").strings : null;
    }

    private static Npz.Array need(Map<String, Npz.Array> a, String k) {
        if (!a.containsKey(k)) throw new IllegalArgumentException("golden set has no '" + k + "' array");
        return a.get(k);
    }

    public static Golden load(Path file) throws IOException {
        return new Golden(Npz.read(file));
    }

    public int size() {
        return inputIds.rows();
    }

    /** Row r's ids and mask trimmed of right padding (at least 2 tokens), as every edgelm runner feeds them. */
    public static long[][] trimmed(long[] ids, long[] mask) {
        int n = 0;
        for (int k = 0; k < mask.length; k++) if (mask[k] != 0) n = k + 1;
        n = Math.max(n, Math.min(2, ids.length));
        return new long[][] {java.util.Arrays.copyOf(ids, n), java.util.Arrays.copyOf(mask, n)};
    }

    // metrics (numpy-equivalent: edgelm/validate/metrics.py)

    /** Mean and minimum cosine similarity of matching rows. */
    public static double[] cosine(float[][] a, float[][] b) {
        double sum = 0, min = Double.POSITIVE_INFINITY;
        for (int r = 0; r < a.length; r++) {
            double num = 0, na = 0, nb = 0;
            for (int k = 0; k < a[r].length; k++) {
                num += (double) a[r][k] * b[r][k];
                na += (double) a[r][k] * a[r][k];
                nb += (double) b[r][k] * b[r][k];
            }
            double c = num / Math.max(Math.sqrt(na) * Math.sqrt(nb), 1e-12);
            sum += c;
            min = Math.min(min, c);
        }
        return new double[] {sum / a.length, min};
    }

    public static double maxAbsError(float[][] a, float[][] b) {
        double m = 0;
        for (int r = 0; r < a.length; r++)
            for (int k = 0; k < a[r].length; k++) m = Math.max(m, Math.abs((double) a[r][k] - b[r][k]));
        return m;
    }

    public static double maxAbs(float[][] a) {
        double m = 0;
        for (float[] row : a) for (float v : row) m = Math.max(m, Math.abs(v));
        return m;
    }

    public static int argmax(float[] row) {
        int best = 0;
        for (int k = 1; k < row.length; k++) if (row[k] > row[best]) best = k;
        return best;
    }

    /** Share (0-1) of rows with the same arg-max. */
    public static double top1Agreement(float[][] a, float[][] b) {
        int same = 0;
        for (int r = 0; r < a.length; r++) if (argmax(a[r]) == argmax(b[r])) same++;
        return (double) same / a.length;
    }

    /** Accuracy in percent of arg-max against labels. */
    public static double accuracy(float[][] logits, long[] labels) {
        int ok = 0;
        for (int r = 0; r < logits.length; r++) if (argmax(logits[r]) == labels[r]) ok++;
        return 100.0 * ok / logits.length;
    }

    /**
     * Compare an artifact's outputs with its reference under its tolerance (cosine, top-1 for classifiers,
     * max |error|, accuracy drop with labels). @return the numbers, "passed" and a one-line "detail"
     */
    public Map<String, Object> compare(float[][] outputs, BundleManifest.Artifact a, boolean classifier) {
        Npz.Array refArr = references.get(a.goldenReference);
        if (refArr == null) throw new IllegalArgumentException("golden set has no " + a.goldenReference);
        float[][] ref = refArr.floatRows();
        Map<String, Object> m = new LinkedHashMap<>();
        List<String> fails = new ArrayList<>();
        if (outputs.length != ref.length || outputs[0].length != ref[0].length) {
            fails.add("outputs are " + outputs.length + "x" + outputs[0].length + ", reference " + ref.length + "x" + ref[0].length);
        } else {
            double[] cos = cosine(outputs, ref);
            double err = maxAbsError(outputs, ref);
            m.put("cosine_mean", cos[0]);
            m.put("cosine_min", cos[1]);
            m.put("max_abs_error", err);
            if (!Double.isNaN(a.minCosine) && !(cos[0] >= a.minCosine)) fails.add(String.format("cosine %.4f < %s", cos[0], a.minCosine));
            if (!Double.isNaN(a.maxAbsError) && !(err <= a.maxAbsError)) fails.add(String.format("max error %.3g > %.3g", err, a.maxAbsError));
            if (classifier) {
                double top1 = top1Agreement(outputs, ref);
                m.put("top1_agreement", top1);
                if (!Double.isNaN(a.minTop1) && !(top1 >= a.minTop1)) fails.add(String.format("top-1 %.3f < %s", top1, a.minTop1));
                if (labels != null) {
                    double acc = accuracy(outputs, labels);
                    m.put("accuracy", acc);
                    if (!Double.isNaN(a.referenceAccuracy) && !Double.isNaN(a.maxAccuracyDrop)) {
                        double drop = a.referenceAccuracy - acc;
                        m.put("accuracy_drop", drop);
                        if (drop > a.maxAccuracyDrop) fails.add(String.format("accuracy drop %.2f > %s points", drop, a.maxAccuracyDrop));
                    }
                }
            }
        }
        m.put("passed", fails.isEmpty());
        m.put("detail", fails.isEmpty() ? "within the " + a.scheme + " tolerance" : String.join("; ", fails));
        return m;
    }
}
