package dev.edgelm.core;

import java.util.LinkedHashMap;
import java.util.Map;

/**
 * The statistics ExecuTorch's LLM runner reports after a generation (LlmCallback.onStats: a JSON object, see
 * executorch extension/llm/runner/stats.h: prompt_tokens, generated_tokens and the millisecond timestamps
 * inference_start_ms, prompt_eval_end_ms, first_token_ms, inference_end_ms), turned into edgelm's speed keys.
 */
public final class LlmStats {
    private LlmStats() {}

    /**
     * Parse the runner's stats JSON.
     * @return prompt_tokens, generated_tokens, ttft_ms (inference start to first token), prefill_tokens_per_s
     *     (prompt tokens over inference start to prompt evaluated), decode_tokens_per_s (tokens after the first
     *     over first token to end; null with fewer than two tokens)
     * @throws IllegalArgumentException malformed JSON or a missing field
     */
    public static Map<String, Object> parse(String json) {
        Map<String, Object> s = Json.obj(Json.parse(json), "stats");
        long prompt = num(s, "prompt_tokens"), generated = num(s, "generated_tokens");
        long start = num(s, "inference_start_ms"), evalEnd = num(s, "prompt_eval_end_ms");
        long first = num(s, "first_token_ms"), end = num(s, "inference_end_ms");
        Map<String, Object> m = new LinkedHashMap<>();
        m.put("prompt_tokens", prompt);
        m.put("generated_tokens", generated);
        m.put("ttft_ms", (double) (first - start));
        m.put("prefill_tokens_per_s", evalEnd > start ? prompt / ((evalEnd - start) / 1000.0) : null);
        m.put("decode_tokens_per_s", generated > 1 && end > first ? (generated - 1) / ((end - first) / 1000.0) : null);
        return m;
    }

    private static long num(Map<String, Object> s, String key) {
        Object v = s.get(key);
        if (!(v instanceof Number)) throw new IllegalArgumentException("runner stats: \"" + key + "\" is missing");
        return ((Number) v).longValue();
    }
}
