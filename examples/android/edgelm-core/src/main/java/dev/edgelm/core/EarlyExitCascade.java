package dev.edgelm.core;

import java.nio.file.Path;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * An early-exit cascade run on the device (edgelm's {@code exporters/cascade.py}, the same rule): the model split
 * into segments, run in order on one sequence, stopping at the first exit (off-ramp) whose confidence passes the
 * threshold (DeeBERT, Xin et al. ACL 2020). Segment 0 takes int64 {@code input_ids} and {@code attention_mask}
 * [seq]; segment k &gt; 0 takes the previous segment's hidden states (float32 [seq, hidden], row-major) and the
 * mask; every segment but the last returns (hidden states, logits [num_labels]), the last returns logits.
 *
 * <p>As a {@link ModelRunner} it returns the answering exit's logits; {@link #lastExitLayer()} says which encoder
 * layer answered the last call. Chained without exiting (threshold {@link #neverExit}), the segments compute
 * the whole model.
 */
public final class EarlyExitCascade implements ModelRunner {
    /** The output of one segment on one sequence: hidden states (null from the last segment) and logits. */
    public static final class Output {
        public final float[] hidden, logits;

        public Output(float[] hidden, float[] logits) {
            this.hidden = hidden;
            this.logits = logits;
        }
    }

    /** One segment loaded in its runtime (the app implements it for ExecuTorch, LiteRT and ONNX Runtime). */
    public interface SegmentRunner extends AutoCloseable {
        /**
         * Run one sequence: segment 0 gets {@code inputIds} (and {@code hiddenStates} null), later segments get
         * {@code hiddenStates} float32 [seq * hidden] (and {@code inputIds} null); {@code attentionMask} int64
         * [seq] for both, padding already trimmed.
         */
        Output run(long[] inputIds, float[] hiddenStates, long[] attentionMask) throws Exception;

        /** Runtime name to version, for the results JSON. */
        Map<String, String> versions();

        @Override
        default void close() throws Exception {}
    }

    /** Opens segment {@code index} of a cascade from its file with {@code threads} CPU threads. */
    public interface SegmentOpener {
        SegmentRunner open(BundleManifest.Segment segment, int index, Path file, int threads) throws Exception;
    }

    private final BundleManifest.Cascade policy;
    private final List<SegmentRunner> segments;
    private final double threshold;
    /** Shared with the {@link #withThreshold} copies: the segments are closed once. */
    private final boolean[] closed;
    private int lastExitLayer = -1, lastSegments = 0;

    /** A cascade over already opened segments, one per {@code policy.segments}, at {@code threshold}. */
    public EarlyExitCascade(BundleManifest.Cascade policy, List<SegmentRunner> segments, double threshold) {
        this(policy, segments, threshold, new boolean[1]);
    }

    private EarlyExitCascade(BundleManifest.Cascade policy, List<SegmentRunner> segments, double threshold, boolean[] closed) {
        if (segments.size() != policy.segments.size())
            throw new IllegalArgumentException(segments.size() + " segments opened, the cascade has " + policy.segments.size());
        this.policy = policy;
        this.segments = segments;
        this.threshold = threshold;
        this.closed = closed;
    }

    /**
     * Open every segment of cascade artifact {@code a} (its files beside the manifest in {@code dir}; their
     * sha256 are checked with the artifact's companions by {@link BundleManifest#checkArtifact}) at the
     * manifest's threshold. The segments opened so far are closed when one fails.
     * @throws IllegalArgumentException {@code a} is not a cascade
     */
    public static EarlyExitCascade open(BundleManifest.Artifact a, Path dir, SegmentOpener opener, int threads) throws Exception {
        if (a.cascade == null) throw new IllegalArgumentException(a.file + " is not an early-exit cascade");
        List<SegmentRunner> opened = new ArrayList<>();
        try {
            for (int k = 0; k < a.cascade.segments.size(); k++) {
                BundleManifest.Segment s = a.cascade.segments.get(k);
                opened.add(opener.open(s, k, dir.resolve(s.file), threads));
            }
        } catch (Exception e) {
            for (SegmentRunner r : opened) {
                try {
                    r.close();
                } catch (Exception ignored) {
                    // the open failure is the error to report
                }
            }
            throw e;
        }
        return new EarlyExitCascade(a.cascade, opened, a.cascade.threshold);
    }

    /** The same opened segments at another threshold (a sweep); closing any of them closes the segments, once. */
    public EarlyExitCascade withThreshold(double t) {
        return new EarlyExitCascade(policy, segments, t, closed);
    }

    /** A threshold with which only the last exit answers (max_prob cannot reach 1.01, entropy cannot fall below -1). */
    public static double neverExit(String measure) {
        return "max_prob".equals(measure) ? 1.01 : -1.0;
    }

    /**
     * Confidence of one row of logits: the largest softmax probability ({@code max_prob}, 0-1) or the softmax
     * entropy ({@code entropy}, nats), in double precision as edgelm computes it.
     * @throws IllegalArgumentException another measure
     */
    public static double confidence(float[] logits, String measure) {
        double max = Double.NEGATIVE_INFINITY;
        for (float z : logits) max = Math.max(max, z);
        double[] p = new double[logits.length];
        double sum = 0;
        for (int k = 0; k < p.length; k++) sum += p[k] = Math.exp(logits[k] - max);
        double best = 0, entropy = 0;
        for (int k = 0; k < p.length; k++) {
            p[k] /= sum;
            best = Math.max(best, p[k]);
            entropy -= p[k] * Math.log(Math.max(p[k], 1e-12));
        }
        if ("max_prob".equals(measure)) return best;
        if ("entropy".equals(measure)) return entropy;
        throw new IllegalArgumentException("unknown confidence measure " + measure + ": use max_prob or entropy");
    }

    /** Whether a confidence passes the threshold: max_prob {@code >=}, entropy {@code <=}. */
    public static boolean confident(double conf, String measure, double threshold) {
        return "max_prob".equals(measure) ? conf >= threshold : conf <= threshold;
    }

    /** The answering exit's logits float32 [num_labels] for one sequence (see the class doc). */
    @Override
    public float[] run(long[] inputIds, long[] attentionMask) throws Exception {
        float[] hidden = null;
        for (int k = 0; k < segments.size(); k++) {
            Output out = segments.get(k).run(k == 0 ? inputIds : null, hidden, attentionMask);
            boolean last = k == segments.size() - 1;
            if (last || confident(confidence(out.logits, policy.confidence), policy.confidence, threshold)) {
                lastExitLayer = policy.segments.get(k).lastLayer;
                lastSegments = k + 1;
                return out.logits;
            }
            if (out.hidden == null) throw new IllegalStateException("segment " + k + " returned no hidden states");
            hidden = out.hidden;
        }
        throw new IllegalStateException("a cascade without segments");
    }

    /** The encoder layer (1-based) whose exit answered the last {@link #run}; -1 before the first. */
    public int lastExitLayer() {
        return lastExitLayer;
    }

    /** How many segments the last {@link #run} ran. */
    public int lastSegments() {
        return lastSegments;
    }

    public double threshold() {
        return threshold;
    }

    public BundleManifest.Cascade policy() {
        return policy;
    }

    /** The first segment's runtime versions (the segments share one runtime). */
    @Override
    public Map<String, String> versions() {
        Map<String, String> v = new LinkedHashMap<>(segments.get(0).versions());
        v.put("early_exit_segments", String.valueOf(segments.size()));
        return v;
    }

    @Override
    public void close() throws Exception {
        synchronized (closed) {
            if (closed[0]) return;
            closed[0] = true;
        }
        Exception first = null;
        for (SegmentRunner r : segments) {
            try {
                r.close();
            } catch (Exception e) {
                if (first == null) first = e;
            }
        }
        if (first != null) throw first;
    }
}
