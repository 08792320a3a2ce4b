package dev.edgelm.core;

import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.function.IntConsumer;

/**
 * Greedy generation, perplexity, speed and token agreement over a {@link Decoder}, the same definitions as
 * edgelm's Python side (edgelm/generation.py: generate, perplexity, speed, token_agreement), so that numbers
 * measured on a phone and on the host mean the same.
 */
public final class Generation {
    private Generation() {}

    /**
     * A causal LM with its KV cache inside the runtime (an ExecuTorch .pte's "forward", a LiteRT decoder's
     * prefill/decode signatures). {@link #forward} feeds {@code tokens} at positions {@code pos ..
     * pos + n - 1} and returns float32 logits [rows][vocab]: one row per token when {@link #fullLogits}, else
     * the last position's only. Feeding from position 0 starts a new sequence.
     */
    public interface Decoder extends AutoCloseable {
        float[][] forward(int[] tokens, int pos) throws Exception;

        boolean fullLogits();

        /** The context length, tokens. */
        int maxContext();

        /** Runtime name to version, for the results JSON. */
        Map<String, String> versions();

        @Override
        default void close() throws Exception {}
    }

    /** One generation: new tokens (the EOS that stopped it included) and its timing (ms, tokens/s). */
    public static final class Result {
        public final List<Integer> tokens = new ArrayList<>();
        public boolean stoppedAtEos;
        public int promptTokens;
        public double ttftMs, prefillTokensPerS, decodeTokensPerS;
        public float[] firstLogits;
        public final List<Double> stepMs = new ArrayList<>();

        public int[] tokenArray() {
            return tokens.stream().mapToInt(Integer::intValue).toArray();
        }
    }

    /** Index of the largest logit (the first on ties, as numpy's argmax). */
    public static int argmax(float[] logits) {
        int best = 0;
        for (int k = 1; k < logits.length; k++) if (logits[k] > logits[best]) best = k;
        return best;
    }

    /**
     * Greedy decoding of up to {@code maxNewTokens} after {@code prompt}: the prompt in one forward call, then
     * one token per call, stopping at a token in {@code eos} or at the context's end. {@code onToken} (may be
     * null) gets each new id as it is chosen. @throws IllegalArgumentException empty prompt or no room left
     */
    public static Result generate(Decoder d, int[] prompt, int maxNewTokens, Set<Integer> eos, IntConsumer onToken)
            throws Exception {
        if (prompt.length == 0) throw new IllegalArgumentException("the prompt is empty");
        if (prompt.length >= d.maxContext())
            throw new IllegalArgumentException("the prompt has " + prompt.length + " tokens and the context " + d.maxContext());
        Result r = new Result();
        r.promptTokens = prompt.length;
        long t0 = System.nanoTime();
        float[][] out = d.forward(prompt, 0);
        long tPrefill = System.nanoTime() - t0;
        float[] logits = out[out.length - 1];
        r.firstLogits = logits.clone();
        int pos = prompt.length;
        int token = argmax(logits);
        r.ttftMs = (System.nanoTime() - t0) / 1e6;
        r.prefillTokensPerS = tPrefill > 0 ? prompt.length / (tPrefill / 1e9) : 0.0;
        long t1 = System.nanoTime();
        while (true) {
            r.tokens.add(token);
            if (onToken != null) onToken.accept(token);
            if (eos.contains(token)) {
                r.stoppedAtEos = true;
                break;
            }
            if (r.tokens.size() >= maxNewTokens || pos >= d.maxContext()) break;
            long ts = System.nanoTime();
            out = d.forward(new int[] {token}, pos);
            pos++;
            token = argmax(out[out.length - 1]);
            r.stepMs.add((System.nanoTime() - ts) / 1e6);
        }
        int steps = r.tokens.size() - 1;
        double elapsed = (System.nanoTime() - t1) / 1e9;
        r.decodeTokensPerS = steps > 0 && elapsed > 0 ? steps / elapsed : 0.0;
        return r;
    }

    /**
     * exp(mean negative log-likelihood) of {@code tokens[1:]}, each given the ones before it, from position 0
     * ({@code tokens.length} &lt;= the context). A decoder with full logits is fed {@code chunk} tokens per
     * call, one with the last position's logits one token per call.
     */
    public static double perplexity(Decoder d, int[] tokens, int chunk) throws Exception {
        double nll = 0.0;
        int count = 0, pos = 0;
        int step = d.fullLogits() ? chunk : 1;
        while (pos < tokens.length - 1) {
            int n = Math.min(step, tokens.length - 1 - pos);
            int[] feed = java.util.Arrays.copyOfRange(tokens, pos, pos + n);
            float[][] logits = d.forward(feed, pos);
            int first = logits.length - n;
            if (first < 0) throw new IllegalStateException("the decoder returned " + logits.length + " rows for " + n + " tokens");
            for (int k = 0; k < n; k++) nll -= logSoftmaxAt(logits[first + k], tokens[pos + 1 + k]);
            count += n;
            pos += n;
        }
        return Math.exp(nll / count);
    }

    /** log softmax(logits)[target], in double precision. */
    public static double logSoftmaxAt(float[] logits, int target) {
        double max = Double.NEGATIVE_INFINITY;
        for (float v : logits) max = Math.max(max, v);
        double sum = 0.0;
        for (float v : logits) sum += Math.exp(v - max);
        return (logits[target] - max) - Math.log(sum);
    }

    /**
     * Prefill and decode speed: {@code prompt} in one call, then {@code newTokens} greedy steps whatever the
     * tokens are (no EOS stop). Returns prompt_tokens, new_tokens, prefill_tokens_per_s, ttft_ms,
     * decode_tokens_per_s and step_ms (a List of each decode step's ms), the keys edgelm's speed() writes.
     */
    public static Map<String, Object> speed(Decoder d, int[] prompt, int newTokens) throws Exception {
        Result r = generate(d, prompt, newTokens, java.util.Collections.emptySet(), null);
        Map<String, Object> m = new LinkedHashMap<>();
        m.put("prompt_tokens", prompt.length);
        m.put("new_tokens", r.tokens.size());
        m.put("prefill_tokens_per_s", r.prefillTokensPerS);
        m.put("ttft_ms", r.ttftMs);
        m.put("decode_tokens_per_s", r.decodeTokensPerS);
        m.put("step_ms", r.stepMs);
        return m;
    }

    /**
     * Greedy tokens against the reference's, row by row (rows padded with -1 are cut at the first -1):
     * agreement (share of rows with every token equal, [0, 1]), mean_prefix (mean tokens before the first
     * difference) and prompts.
     */
    public static Map<String, Object> tokenAgreement(long[][] reference, long[][] tokens) {
        if (reference.length != tokens.length)
            throw new IllegalArgumentException(tokens.length + " rows against " + reference.length + " reference rows");
        int same = 0;
        double prefix = 0;
        for (int r = 0; r < reference.length; r++) {
            long[] a = unpad(reference[r]), b = unpad(tokens[r]);
            int n = 0;
            while (n < Math.min(a.length, b.length) && a[n] == b[n]) n++;
            prefix += n;
            if (java.util.Arrays.equals(a, b)) same++;
        }
        Map<String, Object> m = new LinkedHashMap<>();
        m.put("agreement", reference.length == 0 ? 0.0 : (double) same / reference.length);
        m.put("mean_prefix", reference.length == 0 ? 0.0 : prefix / reference.length);
        m.put("prompts", reference.length);
        return m;
    }

    /** A -1-padded row without its padding. */
    public static long[] unpad(long[] row) {
        int n = 0;
        for (long v : row) if (v >= 0) n++;
        long[] out = new long[n];
        int k = 0;
        for (long v : row) if (v >= 0) out[k++] = v;
        return out;
    }

    /** Token rows as [rows][width], padded with -1 (the golden set's layout). */
    public static long[][] pad(List<int[]> rows, int width) {
        long[][] out = new long[rows.size()][width];
        for (int r = 0; r < out.length; r++) {
            java.util.Arrays.fill(out[r], -1L);
            int[] row = rows.get(r);
            for (int k = 0; k < Math.min(width, row.length); k++) out[r][k] = row[k];
        }
        return out;
    }
}
