package dev.edgelm.core;

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Comparator;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.ConcurrentHashMap;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/**
 * Byte-level BPE (GPT-2, Radford et al. 2019; the SmolLM, Llama 3 and Qwen tokenizers), read from a Hugging
 * Face {@code tokenizer.json} and equal to {@code tokenizers} for the configurations edgelm's {@code --bundle
 * android} accepts (edgelm/appbundle.py, byte_level_bpe_settings): no normalizer; added tokens matched first
 * (leftmost, longest); the {@code Digits} pre-tokenizer when the file has it; {@code ByteLevel}'s split regex;
 * each piece's UTF-8 bytes mapped to printable characters (bytes_to_unicode) and merged by rank; the
 * {@code ByteLevel} decoder. Encoding adds no special tokens (a chat-templated prompt already holds them).
 *
 * <p>Thread-safe after construction (the merge cache is concurrent).
 */
public final class ByteLevelBpeTokenizer {
    /** GPT-2's pre-tokenizer regex, as {@code tokenizers}' ByteLevel uses it (\s is Unicode White_Space). */
    static final Pattern SPLIT = Pattern.compile(
            "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+",
            Pattern.UNICODE_CHARACTER_CLASS);

    private static final char[] BYTE_TO_CHAR = new char[256];
    private static final Map<Character, Integer> CHAR_TO_BYTE = new HashMap<>();

    static {
        // bytes_to_unicode: printable Latin-1 bytes map to themselves, the rest to U+0100 upwards
        int n = 0;
        for (int b = 0; b < 256; b++) {
            boolean printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
            BYTE_TO_CHAR[b] = printable ? (char) b : (char) (256 + n++);
            CHAR_TO_BYTE.put(BYTE_TO_CHAR[b], b);
        }
    }

    private final Map<String, Integer> vocab;
    private final String[] idToToken;
    private final Map<String, Integer> mergeRanks;
    private final Map<String, Integer> added = new LinkedHashMap<>();
    private final Map<Character, List<String>> addedByFirstChar = new HashMap<>();
    private final boolean individualDigits, ignoreMerges;
    private final Map<String, int[]> cache = new ConcurrentHashMap<>();

    private ByteLevelBpeTokenizer(Map<String, Object> tok) {
        Map<String, Object> model = Json.obj(tok.get("model"), "model");
        if (!"BPE".equals(model.get("type")))
            throw new IllegalArgumentException("tokenizer.json: model " + model.get("type") + " is not BPE");
        if (tok.get("normalizer") != null)
            throw new IllegalArgumentException("tokenizer.json: a normalizer is not supported by this tokenizer");
        individualDigits = digitsStep(tok.get("pre_tokenizer"));
        ignoreMerges = Boolean.TRUE.equals(model.get("ignore_merges"));
        vocab = new HashMap<>();
        int maxId = -1;
        for (Map.Entry<String, Object> e : Json.obj(model.get("vocab"), "vocab").entrySet()) {
            int id = ((Number) e.getValue()).intValue();
            vocab.put(e.getKey(), id);
            maxId = Math.max(maxId, id);
        }
        List<Object> addedTokens = tok.get("added_tokens") == null ? java.util.Collections.emptyList() : Json.arr(tok.get("added_tokens"), "added_tokens");
        for (Object o : addedTokens) {
            Map<String, Object> t = Json.obj(o, "added token");
            int id = ((Number) t.get("id")).intValue();
            String content = Json.str(t, "content");
            added.put(content, id);
            maxId = Math.max(maxId, id);
            if (!content.isEmpty()) addedByFirstChar.computeIfAbsent(content.charAt(0), k -> new ArrayList<>()).add(content);
        }
        for (List<String> l : addedByFirstChar.values()) l.sort(Comparator.comparingInt(String::length).reversed());
        idToToken = new String[maxId + 1];
        for (Map.Entry<String, Integer> e : vocab.entrySet()) idToToken[e.getValue()] = e.getKey();
        for (Map.Entry<String, Integer> e : added.entrySet()) idToToken[e.getValue()] = e.getKey();
        mergeRanks = new HashMap<>();
        int rank = 0;
        for (Object m : Json.arr(model.get("merges"), "merges")) {
            String pair;
            if (m instanceof String) {
                String s = (String) m;
                int sp = s.indexOf(' ', 1);
                if (sp < 0) throw new IllegalArgumentException("tokenizer.json: merge " + s + " is not 'a b'");
                pair = s.substring(0, sp) + ' ' + s.substring(sp + 1);
            } else {
                List<Object> ab = Json.arr(m, "merge");
                pair = ab.get(0) + " " + ab.get(1);
            }
            mergeRanks.putIfAbsent(pair, rank++);
        }
    }

    /** Whether the pre-tokenizer is ByteLevel alone (false) or Digits(individual_digits) then ByteLevel (true). */
    private static boolean digitsStep(Object pre) {
        Map<String, Object> p = Json.obj(pre, "pre_tokenizer");
        List<Object> steps = "Sequence".equals(p.get("type")) ? Json.arr(p.get("pretokenizers"), "pretokenizers") : java.util.Collections.singletonList((Object) p);
        boolean digits = false;
        if (steps.size() == 2 && "Digits".equals(Json.obj(steps.get(0), "step").get("type"))) {
            digits = Boolean.TRUE.equals(Json.obj(steps.get(0), "step").get("individual_digits"));
            steps = steps.subList(1, 2);
        }
        Map<String, Object> last = Json.obj(steps.get(0), "step");
        if (steps.size() != 1 || !"ByteLevel".equals(last.get("type")) || Boolean.TRUE.equals(last.get("add_prefix_space"))
                || Boolean.FALSE.equals(last.get("use_regex")))
            throw new IllegalArgumentException("tokenizer.json: pre-tokenizer " + Json.write(pre) + " is not byte-level BPE");
        return digits;
    }

    /** Parse tokenizer.json text. @throws IllegalArgumentException not a byte-level BPE tokenizer, or malformed */
    public static ByteLevelBpeTokenizer parse(String json) {
        return new ByteLevelBpeTokenizer(Json.obj(Json.parse(json), "tokenizer.json"));
    }

    /** Read a tokenizer.json file. @throws IOException unreadable */
    public static ByteLevelBpeTokenizer load(Path file) throws IOException {
        return parse(new String(Files.readAllBytes(file), StandardCharsets.UTF_8));
    }

    /** Vocabulary size: the largest id + 1 (BPE vocabulary and added tokens). */
    public int vocabSize() {
        return idToToken.length;
    }

    /** The id of a token string (BPE vocabulary or added token), or -1. */
    public int tokenId(String token) {
        Integer id = added.get(token);
        if (id == null) id = vocab.get(token);
        return id == null ? -1 : id;
    }

    /** Token ids of {@code text}, no special tokens added (tokenizers: {@code encode(text, add_special_tokens=False)}). */
    public int[] encode(String text) {
        IntList out = new IntList();
        int start = 0, i = 0;
        while (i < text.length()) {
            String hit = addedAt(text, i);
            if (hit == null) {
                i++;
                continue;
            }
            encodeOrdinary(text.substring(start, i), out);
            out.add(added.get(hit));
            i += hit.length();
            start = i;
        }
        encodeOrdinary(text.substring(start), out);
        return out.toArray();
    }

    private String addedAt(String text, int i) {
        List<String> candidates = addedByFirstChar.get(text.charAt(i));
        if (candidates == null) return null;
        for (String c : candidates) if (text.startsWith(c, i)) return c;
        return null;
    }

    private void encodeOrdinary(String text, IntList out) {
        if (text.isEmpty()) return;
        if (!individualDigits) {
            splitAndMerge(text, out);
            return;
        }
        int start = 0;
        for (int i = 0; i < text.length(); ) {
            int cp = text.codePointAt(i);
            int len = Character.charCount(cp);
            if (isNumeric(cp)) {
                splitAndMerge(text.substring(start, i), out);
                splitAndMerge(text.substring(i, i + len), out);
                start = i + len;
            }
            i += len;
        }
        splitAndMerge(text.substring(start), out);
    }

    /** Rust's char::is_numeric: general categories Nd, Nl, No. */
    private static boolean isNumeric(int cp) {
        int t = Character.getType(cp);
        return t == Character.DECIMAL_DIGIT_NUMBER || t == Character.LETTER_NUMBER || t == Character.OTHER_NUMBER;
    }

    private void splitAndMerge(String text, IntList out) {
        if (text.isEmpty()) return;
        Matcher m = SPLIT.matcher(text);
        int last = 0;
        while (m.find()) {
            if (m.start() > last) word(text.substring(last, m.start()), out);
            word(m.group(), out);
            last = m.end();
        }
        if (last < text.length()) word(text.substring(last), out);
    }

    private void word(String piece, IntList out) {
        byte[] bytes = piece.getBytes(StandardCharsets.UTF_8);
        StringBuilder mapped = new StringBuilder(bytes.length);
        for (byte b : bytes) mapped.append(BYTE_TO_CHAR[b & 0xFF]);
        String w = mapped.toString();
        int[] ids = cache.get(w);
        if (ids == null) {
            ids = bpe(w);
            if (cache.size() < 100_000) cache.put(w, ids);
        }
        for (int id : ids) out.add(id);
    }

    /** Merge a mapped word by rank (lowest first, leftmost on ties) into token ids. */
    private int[] bpe(String w) {
        if (ignoreMerges && vocab.containsKey(w)) return new int[] {vocab.get(w)};
        List<String> parts = new ArrayList<>(w.length());
        for (int k = 0; k < w.length(); k++) parts.add(String.valueOf(w.charAt(k)));
        while (parts.size() > 1) {
            int best = -1, bestRank = Integer.MAX_VALUE;
            for (int k = 0; k + 1 < parts.size(); k++) {
                Integer r = mergeRanks.get(parts.get(k) + " " + parts.get(k + 1));
                if (r != null && r < bestRank) {
                    bestRank = r;
                    best = k;
                }
            }
            if (best < 0) break;
            String a = parts.get(best), b = parts.get(best + 1);
            List<String> next = new ArrayList<>(parts.size());
            for (int k = 0; k < parts.size(); ) {
                if (k + 1 < parts.size() && parts.get(k).equals(a) && parts.get(k + 1).equals(b)) {
                    next.add(a + b);
                    k += 2;
                } else next.add(parts.get(k++));
            }
            parts = next;
        }
        int[] ids = new int[parts.size()];
        for (int k = 0; k < ids.length; k++) {
            Integer id = vocab.get(parts.get(k));
            if (id == null) throw new IllegalArgumentException("token " + parts.get(k) + " is not in the vocabulary");
            ids[k] = id;
        }
        return ids;
    }

    /** The bytes a token id stands for (its byte-level characters mapped back; unmapped text as UTF-8). */
    public byte[] tokenBytes(int id) {
        if (id < 0 || id >= idToToken.length || idToToken[id] == null)
            throw new IllegalArgumentException("token id " + id + " is outside the vocabulary");
        String t = idToToken[id];
        byte[] out = new byte[t.length()];
        for (int k = 0; k < t.length(); k++) {
            Integer b = CHAR_TO_BYTE.get(t.charAt(k));
            if (b == null) return t.getBytes(StandardCharsets.UTF_8);
            out[k] = (byte) (int) b;
        }
        return out;
    }

    /** Text of token ids, special tokens kept (tokenizers: {@code decode(ids, skip_special_tokens=False)}). */
    public String decode(int[] ids) {
        ByteArrayOutputStream b = new ByteArrayOutputStream();
        for (int id : ids) { byte[] t = tokenBytes(id); b.write(t, 0, t.length); }
        return new String(b.toByteArray(), StandardCharsets.UTF_8);
    }

    /**
     * Incremental decoding for streaming: {@link #push} returns the text completed by one more token (empty
     * while a multi-byte character is still incomplete, as when an emoji spans several tokens).
     */
    public final class StreamDecoder {
        private final ByteArrayOutputStream pending = new ByteArrayOutputStream();

        public String push(int id) {
            byte[] t = tokenBytes(id);
            pending.write(t, 0, t.length);
            byte[] b = pending.toByteArray();
            int complete = completePrefix(b);
            pending.reset();
            pending.write(b, complete, b.length - complete);
            return new String(b, 0, complete, StandardCharsets.UTF_8);
        }

        /** What is left at the end (an incomplete character becomes U+FFFD). */
        public String flush() {
            String s = new String(pending.toByteArray(), StandardCharsets.UTF_8);
            pending.reset();
            return s;
        }
    }

    public StreamDecoder streamDecoder() {
        return new StreamDecoder();
    }

    /** Length of the longest prefix of {@code b} that does not end inside a UTF-8 sequence still being completed. */
    static int completePrefix(byte[] b) {
        int n = b.length;
        for (int back = 1; back <= Math.min(3, n); back++) {
            int c = b[n - back] & 0xFF;
            if ((c & 0xC0) == 0x80) continue; // a continuation byte: look further back for the lead byte
            int need = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
            return need > back ? n - back : n;
        }
        return n;
    }

    /** A growable int array. */
    static final class IntList {
        private int[] a = new int[16];
        private int n;

        void add(int v) {
            if (n == a.length) a = Arrays.copyOf(a, 2 * n);
            a[n++] = v;
        }

        int[] toArray() {
            return Arrays.copyOf(a, n);
        }
    }
}
