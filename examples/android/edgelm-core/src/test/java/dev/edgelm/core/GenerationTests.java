package dev.edgelm.core;

import static dev.edgelm.core.CoreTests.check;

import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardCopyOption;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Collections;
import java.util.HashMap;
import java.util.HashSet;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;

/** Tests of the generation check (Generation, GenerativeCheck) on a text-generation android bundle. */
final class GenerationTests {
    private GenerationTests() {}

    /**
     * A decoder that answers from the golden set instead of a model, and checks how it is driven: a sequence
     * starts at position 0 with a golden prompt (or the perplexity window), then every call continues at the
     * next position. For a golden prompt it gives the reference's next token (or, from step {@code deviate[r]}
     * of prompt r, token 0 for ever); along the perplexity window the true next token with probability
     * 1/reference perplexity, so that the perplexity it yields is the reference's; anything else uniform.
     */
    static final class ReplayDecoder implements Generation.Decoder {
        final GenerativeCheck g;
        final int vocab, context;
        final int[] deviate;
        final List<Integer> seq = new ArrayList<>();
        int prompt = -1, promptLen;
        boolean window;
        int calls;

        ReplayDecoder(GenerativeCheck g, int[] deviate) {
            this.g = g;
            this.vocab = g.referenceNextLogits[0].length;
            this.context = g.manifest.artifacts.get(0).maxSeqLen;
            this.deviate = deviate;
        }

        @Override
        public float[][] forward(int[] tokens, int pos) {
            calls++;
            if (pos == 0) {
                seq.clear();
                prompt = -1;
                for (int r = 0; r < g.promptTokens.length; r++) {
                    long[] p = Generation.unpad(g.promptTokens[r]);
                    if (p.length == tokens.length && Arrays.equals(p, Arrays.stream(tokens).asLongStream().toArray())) prompt = r;
                }
                promptLen = tokens.length;
                window = prompt < 0 && tokens.length == 1 && tokens[0] == g.perplexityTokens[0];
            } else if (pos != seq.size()) throw new IllegalStateException("fed position " + pos + " after " + seq.size() + " tokens");
            for (int t : tokens) seq.add(t);
            if (seq.size() > context) throw new IllegalStateException("past the context");
            float[] logits = new float[vocab];
            int step = seq.size() - promptLen; // new tokens fed back so far
            if (prompt >= 0) {
                long[] ref = Generation.unpad(g.referenceTokens[prompt]);
                boolean onTrack = step <= ref.length;
                for (int k = 0; k < step && onTrack; k++) onTrack = seq.get(promptLen + k) == ref[k];
                if (onTrack && step < deviate[prompt] && step < ref.length) logits[(int) ref[step]] = 10f;
            } else if (window && seq.size() < g.perplexityTokens.length) {
                double p = 1.0 / g.referencePerplexity;
                logits[g.perplexityTokens[seq.size()]] = (float) Math.log(p * (vocab - 1) / (1 - p));
            }
            return new float[][] {logits};
        }

        @Override
        public boolean fullLogits() {
            return false;
        }

        @Override
        public int maxContext() {
            return context;
        }

        @Override
        public Map<String, String> versions() {
            return Collections.singletonMap("replay", "1");
        }
    }

    static void testScoring() throws Exception {
        long[][] ref = {{5, 6, 7, -1}, {1, 2, 3, 4}, {9, -1, -1, -1}};
        long[][] got = {{5, 6, 7, -1}, {1, 2, 8, 4}, {9, 3, -1, -1}};
        Map<String, Object> a = Generation.tokenAgreement(ref, got);
        check((Double) a.get("agreement") == 1.0 / 3 && (Double) a.get("mean_prefix") == (3 + 2 + 1) / 3.0,
                "agreement 1/3 and mean prefix 2 (a longer row differs): " + a);
        // a decoder that counts up: greedy stops at the EOS and at max_new_tokens, positions run on
        Generation.Decoder up = new Generation.Decoder() {
            int next;

            @Override
            public float[][] forward(int[] tokens, int pos) {
                float[] l = new float[16];
                next = tokens[tokens.length - 1] + 1;
                l[next % 16] = 1f;
                return new float[][] {l};
            }

            @Override
            public boolean fullLogits() {
                return false;
            }

            @Override
            public int maxContext() {
                return 12;
            }

            @Override
            public Map<String, String> versions() {
                return Collections.emptyMap();
            }
        };
        Set<Integer> eos = new HashSet<>(Collections.singletonList(7));
        List<Integer> streamed = new ArrayList<>();
        Generation.Result r = Generation.generate(up, new int[] {2, 3}, 10, eos, streamed::add);
        check(r.tokens.equals(Arrays.asList(4, 5, 6, 7)) && r.stoppedAtEos && streamed.equals(r.tokens), "greedy stops at EOS " + r.tokens);
        r = Generation.generate(up, new int[] {0}, 3, eos, null);
        check(r.tokens.equals(Arrays.asList(1, 2, 3)) && !r.stoppedAtEos && r.stepMs.size() == 2, "greedy stops at max_new_tokens " + r.tokens);
        r = Generation.generate(up, new int[] {8, 9, 10, 11, 12, 13, 14, 15, 0, 1}, 10, Collections.emptySet(), null);
        check(r.tokens.size() == 3, "greedy stops at the context's end (10 + 2 positions of 12): " + r.tokens);
        boolean threw = false;
        try {
            Generation.generate(up, new int[12], 4, eos, null);
        } catch (IllegalArgumentException e) {
            threw = e.getMessage().contains("context");
        }
        check(threw, "a prompt that fills the context is refused");
        // ExecuTorch's runner stats (stats.h's JSON): 20 prompt tokens in 40 ms, first token at 50 ms, 31 more by 550 ms
        Map<String, Object> st = LlmStats.parse("{\"prompt_tokens\":20,\"generated_tokens\":32,\"model_load_start_ms\":1,"
                + "\"model_load_end_ms\":2,\"inference_start_ms\":1000,\"inference_end_ms\":1550,\"prompt_eval_end_ms\":1040,"
                + "\"first_token_ms\":1050,\"aggregate_sampling_time_ms\":3,\"SCALING_FACTOR_UNITS_PER_SECOND\":1000}");
        check(st.get("ttft_ms").equals(50.0) && st.get("prefill_tokens_per_s").equals(500.0) && st.get("decode_tokens_per_s").equals(62.0),
                "runner stats to TTFT 50 ms, prefill 500 and decode 62 tokens/s: " + st);
        float[] uniform = new float[50];
        check(Math.abs(Generation.logSoftmaxAt(uniform, 3) + Math.log(50)) < 1e-12, "log softmax of uniform logits");
    }

    static void testManifest(Path bundle, Path work) throws Exception {
        BundleManifest m = BundleManifest.load(bundle);
        check(m.isGenerator() && !m.isClassifier() && m.kind.equals("generator"), "a text-generation bundle: " + m.kind);
        BundleManifest.Artifact a = m.artifacts.get(0);
        check(a.runtime.equals("executorch") && a.file.endsWith(".pte") && a.minTokenAgreement > 0 && a.maxPerplexityRatio >= 1,
                "decoder artifact and its gates: " + a.file + " " + a.minTokenAgreement + " " + a.maxPerplexityRatio);
        check(a.maxSeqLen == ((Number) m.generation.get("context_length")).intValue(), "context length " + a.maxSeqLen);
        check(m.verify(bundle).isEmpty(), "a fresh generative bundle verifies: " + m.verify(bundle));
        Path copy = work.resolve("gen-bundle-copy");
        Files.createDirectories(copy);
        try (java.util.stream.Stream<Path> st = Files.list(bundle)) {
            for (Path f : (Iterable<Path>) st::iterator) Files.copy(f, copy.resolve(f.getFileName()), StandardCopyOption.REPLACE_EXISTING);
        }
        String tj = new String(Files.readAllBytes(copy.resolve("tokenizer.json")), java.nio.charset.StandardCharsets.UTF_8);
        Files.write(copy.resolve("tokenizer.json"), tj.replaceFirst("\"merges\"", "\"merges\" ").getBytes(java.nio.charset.StandardCharsets.UTF_8));
        Files.delete(copy.resolve("prompts.json"));
        List<String> problems = m.verify(copy);
        check(problems.size() == 2 && problems.contains("prompts.json: missing")
                && problems.stream().anyMatch(p -> p.startsWith("tokenizer.json: sha256")), "changed tokenizer and missing prompts detected: " + problems);
    }

    static void testCheck(Path bundle, Path work) throws Exception {
        GenerativeCheck c = new GenerativeCheck(bundle);
        int prompts = c.promptTokens.length;
        // the prompts as text, through this tokenizer, give the exported ids (the chat screen's path)
        int same = 0;
        for (int r = 0; r < prompts; r++)
            if (Arrays.equals(Arrays.stream(c.tokenizer.encode(c.prompts.get(r))).asLongStream().toArray(), Generation.unpad(c.promptTokens[r]))) same++;
        check(same == prompts, "golden prompt texts encode to the exported ids: " + same + " of " + prompts);
        String message = ((String) Json.arr(Json.obj(Json.parse(Files.readString(bundle.resolve("prompts.json"))), "p").get("messages"), "m").get(0));
        check(c.chatPrompt(message).equals(c.prompts.get(0)), "the chat affixes rebuild the first golden prompt");
        Map<String, Object> tok = c.tokenizationCheck();
        check(((Number) tok.get("rows")).intValue() >= prompts + 20 && ((Number) tok.get("mismatched")).intValue() == 0
                && ((Number) tok.get("decode_mismatched")).intValue() == 0, "the bundle's tokenizer cases on the device: " + tok);

        BundleManifest.Artifact a = c.manifest.artifacts.get(0);
        int[] none = new int[prompts];
        Arrays.fill(none, Integer.MAX_VALUE);
        Map<String, Object> good = c.run(a, (art, file, threads) -> new ReplayDecoder(c, none), 2, 1, 3, () -> 42.0);
        Map<?, ?> gg = (Map<?, ?>) good.get("golden");
        check(good.get("error") == null && gg.get("passed").equals(true) && (Double) gg.get("token_agreement") == 1.0,
                "a decoder equal to the reference passes: " + good.get("error") + " " + gg);
        if (!Double.isNaN(c.referencePerplexity)) // the export had WikiText-2 for the perplexity window
            check(Math.abs((Double) gg.get("perplexity_ratio") - 1.0) < 1e-4, "its perplexity is the reference's: " + gg.get("perplexity_ratio"));
        check(((Map<?, ?>) good.get("next_token")).get("top1_agreement").equals(1.0), "first-token arg-max equals the reference's");
        check(((Map<?, ?>) good.get("speed")).get("decode_tokens_per_s") instanceof Double && good.get("speed_1_thread") != null
                && ((List<?>) good.get("latency_samples_ms")).size() == 3, "speed at 2 threads and at 1, 3 timed steps");

        // from step 1 of prompts 0..27 the decoder goes its own way: 4 of 32 prompts agree, under the gate
        int[] dev = new int[prompts];
        Arrays.fill(dev, Integer.MAX_VALUE);
        int off = prompts - 4;
        double prefix = 0;
        for (int r = 0; r < prompts; r++) {
            long[] ref = Generation.unpad(c.referenceTokens[r]);
            if (r < off) dev[r] = 1;
            prefix += r < off ? Math.min(1, ref.length) : ref.length;
        }
        Map<String, Object> bad = c.run(a, (art, file, threads) -> new ReplayDecoder(c, dev), 1, 1, 3, () -> 42.0);
        Map<?, ?> bg = (Map<?, ?>) bad.get("golden");
        check(bad.get("error") == null && bg.get("passed").equals(false) && ((String) bg.get("detail")).contains("token agreement"),
                "a decoder that drifts fails on agreement: " + bg);
        check((Double) bg.get("token_agreement") == 4.0 / prompts && Math.abs((Double) bg.get("mean_prefix") - prefix / prompts) < 1e-9,
                "agreement 4/32 and the mean prefix: " + bg);

        Map<String, Object> broken = c.run(a, (art, file, threads) -> {
            throw new IllegalStateException("LlmModule failed to load");
        }, 1, 0, 1, null);
        check(String.valueOf(broken.get("error")).contains("failed to load"), "a runtime failure is the entry's error");

        // the text path (LlmModule): every reference text back but one, the prompt counted by this tokenizer
        GenerativeCheck.TextGenerator text = (prompt, n) -> {
            int r = c.prompts.indexOf(prompt);
            Map<String, Object> stats = new HashMap<>();
            stats.put("prompt_tokens", c.tokenizer.encode(prompt).length);
            stats.put("decode_tokens_per_s", 100.0);
            return new GenerativeCheck.TextResult(r == 3 ? "something else" : c.referenceTexts.get(r), stats);
        };
        Map<String, Object> tc = c.textCheck(text, "replay");
        check(tc.get("error") == null && ((Number) tc.get("texts_equal")).intValue() == prompts - 1
                && ((Number) tc.get("prompt_token_counts_equal")).intValue() == prompts && Integer.valueOf(3).equals(tc.get("first_different")),
                "text check: 31 of 32 texts equal, every prompt counted alike: " + tc);

        Map<String, Object> device = new LinkedHashMap<>();
        device.put("model", "JVM test");
        device.put("abi", System.getProperty("os.arch"));
        Map<String, Object> doc = c.results(device, Collections.singletonList(bad), Collections.singletonList(tc));
        Path out = work.resolve("gen-results.json");
        OnDeviceCheck.write(doc, out);
        Map<String, Object> back = Json.obj(Json.parse(Files.readString(out)), "results");
        check(((List<?>) back.get("artifacts")).size() == 1 && back.get("tokenization") != null, "generative results JSON written");
    }
}
