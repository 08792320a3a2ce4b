package dev.edgelm.core;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashSet;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;

/**
 * The on-device check of a text-generation bundle, runtime-independent: per decoder artifact, verify its
 * sha256, open it (a {@link Opener} the app provides: ExecuTorch's Module, LiteRT's signatures), decode every
 * golden prompt greedily from its exported token ids, score token agreement against the PyTorch reference,
 * measure perplexity over the golden window, prefill/decode speed (at the bundle's threads and at 1) and peak
 * RSS. The tokenizer check encodes and decodes the bundle's tokenizer cases with {@link ByteLevelBpeTokenizer}
 * and counts differences from Hugging Face's ids; {@link #textCheck} runs the golden prompts as text through
 * a runtime's own tokenizer and generator (ExecuTorch's LlmModule) and compares the text it generates.
 *
 * <p>Results go in the same JSON as encoder checks ({@link OnDeviceCheck#RESULTS_SCHEMA}): "outputs" are the
 * greedy tokens [prompts][new_tokens] padded with -1, with "perplexity", "speed", "speed_1_thread" and
 * "next_token" as edgelm's host runner writes them (edgelm/validate/target.py, run_generative).
 */
public final class GenerativeCheck {
    /** Opens a decoder artifact with {@code threads} CPU threads. */
    public interface Opener {
        Generation.Decoder open(BundleManifest.Artifact artifact, Path file, int threads) throws Exception;
    }

    /** A runtime's text-in, text-out generator (its own tokenizer), greedy. */
    public interface TextGenerator extends AutoCloseable {
        /**
         * Generate up to {@code maxNewTokens} after the (chat-templated) {@code prompt}, greedily.
         * @return the generated text and the runtime's stats (prompt_tokens, generated_tokens, ...)
         */
        TextResult generate(String prompt, int maxNewTokens) throws Exception;

        @Override
        default void close() throws Exception {}
    }

    /** What a {@link TextGenerator} produced. */
    public static final class TextResult {
        public final String text;
        public final Map<String, Object> stats;

        public TextResult(String text, Map<String, Object> stats) {
            this.text = text;
            this.stats = stats;
        }
    }

    public final Path dir;
    public final BundleManifest manifest;
    public final ByteLevelBpeTokenizer tokenizer;
    public final long[][] promptTokens, referenceTokens;
    public final float[][] referenceNextLogits;
    public final int[] perplexityTokens, speedPrompt;
    public final int speedNewTokens, newTokens;
    public final double referencePerplexity;
    public final Set<Integer> eos = new HashSet<>();
    /** The golden prompts as text (chat-templated) and the reference continuations decoded. */
    public final List<String> prompts = new ArrayList<>(), referenceTexts = new ArrayList<>();
    /** The chat template around one user message (the chat screen wraps what the user types in it). */
    public final String chatPrefix, chatSuffix;

    /** Load a generative bundle directory. @throws IOException unreadable files; IllegalArgumentException not generative */
    public GenerativeCheck(Path dir) throws IOException {
        this.dir = dir;
        manifest = BundleManifest.load(dir);
        if (!manifest.isGenerator())
            throw new IllegalArgumentException("not a text-generation bundle (kind " + manifest.kind + ")");
        Map<String, Object> gen = manifest.generation;
        tokenizer = ByteLevelBpeTokenizer.load(dir.resolve(Json.str(manifest.tokenizer, "file")));
        Map<String, Npz.Array> g = Npz.read(dir.resolve(manifest.goldenFile));
        promptTokens = rows(g.get("prompt_tokens"));
        referenceTokens = rows(g.get("reference_tokens"));
        referenceNextLogits = g.get("reference_next_logits").floatRows();
        perplexityTokens = ints(g.get("perplexity_tokens").longs);
        speedPrompt = ints(g.get("speed_prompt").longs);
        speedNewTokens = (int) g.get("speed_new_tokens").longs[0];
        referencePerplexity = g.containsKey("reference_perplexity") ? g.get("reference_perplexity").floats[0] : Double.NaN;
        newTokens = ((Number) gen.get("new_tokens")).intValue();
        for (Object o : Json.arr(gen.get("eos_ids"), "eos_ids")) eos.add(((Number) o).intValue());
        Map<String, Object> chat = Json.obj(gen.get("chat"), "chat");
        chatPrefix = Json.str(chat, "prefix");
        chatSuffix = Json.str(chat, "suffix");
        Map<String, Object> p = Json.obj(Json.parse(read(dir.resolve(Json.str(gen, "prompts_file")))), "prompts");
        for (Object o : Json.arr(p.get("prompts"), "prompts")) prompts.add((String) o);
        for (Object o : Json.arr(p.get("reference_texts"), "reference_texts")) referenceTexts.add((String) o);
    }

    private static String read(Path p) throws IOException {
        return new String(Files.readAllBytes(p), StandardCharsets.UTF_8);
    }

    private static long[][] rows(Npz.Array a) {
        long[][] out = new long[a.rows()][];
        for (int r = 0; r < out.length; r++) out[r] = a.longRow(r);
        return out;
    }

    private static int[] ints(long[] v) {
        int[] out = new int[v.length];
        for (int k = 0; k < v.length; k++) out[k] = (int) v[k];
        return out;
    }

    /** A user message in the model's chat template, as the golden prompts were built. */
    public String chatPrompt(String message) {
        return chatPrefix + message + chatSuffix;
    }

    /** Greedy tokens for every golden prompt, from its exported ids, padded with -1 to new_tokens. */
    public long[][] goldenTokens(Generation.Decoder d, List<float[]> firstLogits) throws Exception {
        List<int[]> rows = new ArrayList<>();
        for (long[] p : promptTokens) {
            Generation.Result r = Generation.generate(d, ints(Generation.unpad(p)), referenceTokens[0].length, eos, null);
            rows.add(r.tokenArray());
            if (firstLogits != null) firstLogits.add(r.firstLogits);
        }
        return Generation.pad(rows, referenceTokens[0].length);
    }

    /**
     * The golden comparison under the artifact's gates: token_agreement, mean_prefix, perplexity and its ratio
     * to the reference's, passed and detail.
     */
    public Map<String, Object> judge(BundleManifest.Artifact a, long[][] tokens, double perplexity) {
        Map<String, Object> agree = Generation.tokenAgreement(referenceTokens, tokens);
        double agreement = (Double) agree.get("agreement");
        double ratio = Double.isNaN(referencePerplexity) || Double.isNaN(perplexity) ? Double.NaN : perplexity / referencePerplexity;
        List<String> problems = new ArrayList<>();
        if (!Double.isNaN(a.minTokenAgreement) && agreement < a.minTokenAgreement)
            problems.add(String.format("token agreement %.2f < %.2f", agreement, a.minTokenAgreement));
        if (!Double.isNaN(a.maxPerplexityRatio) && !Double.isNaN(ratio) && ratio > a.maxPerplexityRatio)
            problems.add(String.format("perplexity ratio %.4f > %.2f", ratio, a.maxPerplexityRatio));
        Map<String, Object> m = new LinkedHashMap<>();
        m.put("token_agreement", agreement);
        m.put("mean_prefix", agree.get("mean_prefix"));
        m.put("perplexity", Double.isNaN(perplexity) ? null : perplexity);
        m.put("reference_perplexity", Double.isNaN(referencePerplexity) ? null : referencePerplexity);
        m.put("perplexity_ratio", Double.isNaN(ratio) ? null : ratio);
        m.put("passed", problems.isEmpty());
        m.put("detail", problems.isEmpty() ? "within the " + a.scheme + " gates" : String.join("; ", problems));
        return m;
    }

    /** Run one decoder artifact; never throws: a failure becomes the entry's "error". */
    public Map<String, Object> run(BundleManifest.Artifact a, Opener opener, int threads, int warmup, int runs,
                                   OnDeviceCheck.MemoryProbe memory) {
        Map<String, Object> e = OnDeviceCheck.newEntry(a);
        try {
            manifest.checkArtifact(dir, a);
            long t0 = System.nanoTime();
            try (Generation.Decoder d = opener.open(a, dir.resolve(a.file), threads)) {
                e.put("load_ms", (System.nanoTime() - t0) / 1e6);
                e.put("runtime", d.versions());
                List<float[]> first = new ArrayList<>();
                long[][] tokens = goldenTokens(d, first);
                e.put("outputs", tokens);
                double ppl = perplexityTokens.length > 1 ? Generation.perplexity(d, perplexityTokens, 128) : Double.NaN;
                e.put("perplexity", Double.isNaN(ppl) ? null : ppl);
                e.put("perplexity_window", perplexityTokens.length);
                e.put("golden", judge(a, tokens, ppl));
                e.put("next_token", nextToken(first));
                Map<String, Object> fast = Generation.speed(d, speedPrompt, Math.max(speedNewTokens, warmup + runs + 1));
                @SuppressWarnings("unchecked")
                List<Double> steps = (List<Double>) fast.remove("step_ms");
                e.put("speed", fast);
                e.put("threads", threads);
                e.put("warmup", warmup);
                e.put("runs", runs);
                e.put("latency_seq_len", 1);
                e.put("latency_samples_ms", new ArrayList<>(steps.subList(warmup, Math.min(steps.size(), warmup + runs))));
                e.put("peak_rss_mb", memory == null ? null : memory.peakRssMb());
            }
            if (threads > 1) {
                try (Generation.Decoder one = opener.open(a, dir.resolve(a.file), 1)) {
                    Map<String, Object> s1 = Generation.speed(one, speedPrompt, Math.max(speedNewTokens, warmup + runs + 1));
                    s1.remove("step_ms");
                    e.put("speed_1_thread", s1);
                }
            } else e.put("speed_1_thread", null);
        } catch (Exception ex) {
            e.put("error", OnDeviceCheck.describe(ex));
        }
        return e;
    }

    private Map<String, Object> nextToken(List<float[]> first) {
        int same = 0;
        double maxErr = 0.0;
        for (int r = 0; r < first.size(); r++) {
            float[] got = first.get(r), ref = referenceNextLogits[r];
            if (Generation.argmax(got) == Generation.argmax(ref)) same++;
            for (int k = 0; k < Math.min(got.length, ref.length); k++) maxErr = Math.max(maxErr, Math.abs((double) got[k] - ref[k]));
        }
        Map<String, Object> m = new LinkedHashMap<>();
        m.put("top1_agreement", first.isEmpty() ? null : (double) same / first.size());
        m.put("max_abs_error", maxErr);
        return m;
    }

    /**
     * The golden prompts as text through a runtime's own tokenizer and generator: how many prompts it counted
     * as many tokens as the exported ids (its tokenizer agrees on them), and how many continuations equal the
     * reference's text (EOS text at the end ignored on both sides).
     */
    public Map<String, Object> textCheck(TextGenerator gen, String runtime) {
        Map<String, Object> m = new LinkedHashMap<>();
        m.put("runtime", runtime);
        int promptsEqual = 0, textsEqual = 0, counted = 0;
        Integer firstDifferent = null;
        List<Double> decode = new ArrayList<>(), ttft = new ArrayList<>();
        try {
            for (int r = 0; r < prompts.size(); r++) {
                TextResult res = gen.generate(prompts.get(r), newTokens);
                Object n = res.stats.get("prompt_tokens");
                if (n instanceof Number) {
                    counted++;
                    if (((Number) n).intValue() == Generation.unpad(promptTokens[r]).length) promptsEqual++;
                }
                if (stripEos(res.text).equals(stripEos(referenceTexts.get(r)))) textsEqual++;
                else if (firstDifferent == null) firstDifferent = r;
                if (res.stats.get("decode_tokens_per_s") instanceof Number) decode.add(((Number) res.stats.get("decode_tokens_per_s")).doubleValue());
                if (res.stats.get("ttft_ms") instanceof Number) ttft.add(((Number) res.stats.get("ttft_ms")).doubleValue());
            }
            m.put("error", null);
        } catch (Exception ex) {
            m.put("error", OnDeviceCheck.describe(ex));
        }
        m.put("prompts", prompts.size());
        m.put("prompt_token_counts_equal", counted == 0 ? null : promptsEqual);
        m.put("texts_equal", textsEqual);
        m.put("first_different", firstDifferent);
        m.put("decode_tokens_per_s", decode.isEmpty() ? null : decode.stream().mapToDouble(Double::doubleValue).average().getAsDouble());
        m.put("ttft_ms", ttft.isEmpty() ? null : ttft.stream().mapToDouble(Double::doubleValue).average().getAsDouble());
        return m;
    }

    private String stripEos(String text) {
        String t = text;
        boolean again = true;
        while (again) {
            again = false;
            for (int id : eos) {
                byte[] b = tokenizer.tokenBytes(id);
                String s = new String(b, StandardCharsets.UTF_8);
                if (!s.isEmpty() && t.endsWith(s)) {
                    t = t.substring(0, t.length() - s.length());
                    again = true;
                }
            }
        }
        return t;
    }

    /**
     * Encode and decode the bundle's tokenizer cases (texts with Hugging Face's ids) here.
     * @return {"rows", "mismatched" (encode), "decode_mismatched", "first_mismatch" (the text, cut to 80
     *     characters, or null), "by_corpus": {corpus: {"rows", "mismatched"}}}
     */
    public Map<String, Object> tokenizationCheck() throws IOException {
        Map<String, Object> doc = Json.obj(Json.parse(read(dir.resolve(Json.str(manifest.generation, "tokenizer_cases_file")))), "cases");
        int rows = 0, mismatched = 0, decodeMismatched = 0;
        String first = null;
        Map<String, Object> byCorpus = new LinkedHashMap<>();
        for (Object o : Json.arr(doc.get("cases"), "cases")) {
            Map<String, Object> c = Json.obj(o, "case");
            String text = Json.str(c, "text"), corpus = Json.str(c, "corpus");
            List<Object> want = Json.arr(c.get("ids"), "ids");
            int[] ids = new int[want.size()];
            for (int k = 0; k < ids.length; k++) ids[k] = ((Number) want.get(k)).intValue();
            boolean bad = !Arrays.equals(tokenizer.encode(text), ids);
            boolean badDecode = !tokenizer.decode(ids).equals(text);
            rows++;
            if (bad) mismatched++;
            if (badDecode) decodeMismatched++;
            if ((bad || badDecode) && first == null) first = text.length() > 80 ? text.substring(0, 80) : text;
            @SuppressWarnings("unchecked")
            Map<String, Object> cc = (Map<String, Object>) byCorpus.computeIfAbsent(corpus, k -> {
                Map<String, Object> z = new LinkedHashMap<>();
                z.put("rows", 0L);
                z.put("mismatched", 0L);
                return z;
            });
            cc.put("rows", (Long) cc.get("rows") + 1);
            if (bad || badDecode) cc.put("mismatched", (Long) cc.get("mismatched") + 1);
        }
        Map<String, Object> m = new LinkedHashMap<>();
        m.put("tokenizer", "edgelm-core ByteLevelBpeTokenizer");
        m.put("rows", rows);
        m.put("mismatched", mismatched);
        m.put("decode_mismatched", decodeMismatched);
        m.put("first_mismatch", first);
        m.put("by_corpus", byCorpus);
        return m;
    }

    /** The results document: {"schema", "device", "bundle", "tokenization", "text_generation", "artifacts"}. */
    public Map<String, Object> results(Map<String, Object> device, List<Map<String, Object>> entries,
                                       List<Map<String, Object>> textChecks) throws IOException {
        Map<String, Object> doc = new LinkedHashMap<>();
        doc.put("schema", OnDeviceCheck.RESULTS_SCHEMA);
        doc.put("device", device);
        doc.put("bundle", manifest.device);
        doc.put("tokenization", tokenizationCheck());
        doc.put("text_generation", textChecks);
        doc.put("artifacts", entries);
        return doc;
    }
}
