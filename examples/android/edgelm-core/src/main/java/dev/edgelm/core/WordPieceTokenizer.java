package dev.edgelm.core;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.text.Normalizer;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;

/**
 * BERT's WordPiece tokenizer, written to give the same token ids as Hugging Face {@code tokenizers}
 * (BertNormalizer + BertPreTokenizer + WordPiece + the [CLS] A [SEP] (B [SEP]) template, truncation
 * "longest_first", right padding to {@code maxLength}).
 *
 * <p>Normalisation, in Hugging Face's order: clean text (drop NUL, U+FFFD and other/control characters
 * except tab, newline and carriage return, which become spaces like every Unicode space separator), put
 * spaces around CJK ideographs, strip accents (NFD, then drop non-spacing marks; on by default when
 * lower-casing), lower-case each code point. Pre-tokenisation splits on white space and isolates every
 * punctuation character (ASCII punctuation and Unicode P* categories). WordPiece then takes the longest
 * vocabulary match from the left, continuing pieces with "##"; a word with no full segmentation, or longer
 * than {@code maxInputCharsPerWord} code points, becomes [UNK]. Special tokens written in the text (e.g.
 * "[MASK]") are kept whole, as Hugging Face does for added tokens.
 *
 * <p>Sources: Devlin et al. 2019 (BERT, arXiv:1810.04805) and the {@code tokenizers} crate
 * (normalizers/bert.rs, pre_tokenizers/bert.rs, models/wordpiece, utils/truncation.rs).
 */
public final class WordPieceTokenizer {
    /** Token ids and attention mask, both of length {@code maxLength} (padded on the right). */
    public static final class Encoding {
        public final long[] inputIds;
        public final long[] attentionMask;
        /** Number of real tokens, [CLS] and [SEP] included. */
        public final int length;

        Encoding(long[] ids, long[] mask, int length) {
            this.inputIds = ids;
            this.attentionMask = mask;
            this.length = length;
        }
    }

    private final Map<String, Integer> vocab;
    private final boolean lowercase, stripAccents, cleanText, handleChineseChars;
    private final String unk, prefix;
    private final int maxInputCharsPerWord, maxLength;
    private final int clsId, sepId, padId, unkId;
    private final List<String> specialTokens = new ArrayList<>();

    /**
     * @param vocabLines the lines of vocab.txt (line i is token id i)
     * @param settings the "tokenizer" object of an edgelm android bundle manifest
     * @throws IllegalArgumentException when a special token is missing from the vocabulary
     */
    public WordPieceTokenizer(List<String> vocabLines, Map<String, Object> settings) {
        vocab = new HashMap<>();
        // a token listed twice takes its last line, as Hugging Face's WordPiece::read_file does
        for (int k = 0; k < vocabLines.size(); k++) vocab.put(vocabLines.get(k), k);
        lowercase = bool(settings, "lowercase", true);
        Object sa = settings.get("strip_accents");
        stripAccents = sa == null ? lowercase : (Boolean) sa;
        cleanText = bool(settings, "clean_text", true);
        handleChineseChars = bool(settings, "handle_chinese_chars", true);
        unk = string(settings, "unk_token", "[UNK]");
        prefix = string(settings, "continuing_subword_prefix", "##");
        maxInputCharsPerWord = ((Number) settings.getOrDefault("max_input_chars_per_word", 100L)).intValue();
        maxLength = ((Number) settings.getOrDefault("max_length", 128L)).intValue();
        clsId = id(string(settings, "cls_token", "[CLS]"));
        sepId = id(string(settings, "sep_token", "[SEP]"));
        padId = id(string(settings, "pad_token", "[PAD]"));
        unkId = id(unk);
        for (String t : new String[] {string(settings, "pad_token", "[PAD]"), unk, string(settings, "cls_token", "[CLS]"),
                string(settings, "sep_token", "[SEP]"), "[MASK]"}) {
            if (vocab.containsKey(t) && !specialTokens.contains(t)) specialTokens.add(t);
        }
    }

    /** Load from a bundle directory: {@code vocab.txt} (or the file the settings name) and the settings. */
    public static WordPieceTokenizer load(Path bundleDir, Map<String, Object> settings) throws IOException {
        String vocabFile = string(settings, "vocab", "vocab.txt");
        List<String> lines = Files.readAllLines(bundleDir.resolve(vocabFile), StandardCharsets.UTF_8);
        return new WordPieceTokenizer(lines, settings);
    }

    public int maxLength() {
        return maxLength;
    }

    private static boolean bool(Map<String, Object> m, String k, boolean d) {
        Object v = m.get(k);
        return v == null ? d : (Boolean) v;
    }

    private static String string(Map<String, Object> m, String k, String d) {
        Object v = m.get(k);
        return v == null ? d : (String) v;
    }

    private int id(String token) {
        Integer v = vocab.get(token);
        if (v == null) throw new IllegalArgumentException("special token " + token + " is not in the vocabulary");
        return v;
    }

    /** One text -> [CLS] tokens [SEP], truncated and padded to {@code maxLength}. */
    public Encoding encode(String text) {
        return encode(text, null);
    }

    /** A text pair -> [CLS] A [SEP] B [SEP] (B may be null), truncated longest-first and padded. */
    public Encoding encode(String text, String pair) {
        List<Integer> a = tokenize(text);
        List<Integer> b = pair == null ? null : tokenize(pair);
        int added = b == null ? 2 : 3;
        int budget = Math.max(0, maxLength - added);
        int n1 = a.size(), n2 = b == null ? 0 : b.size();
        if (n1 + n2 > budget) {
            if (b == null) {
                n1 = budget;
            } else { // tokenizers' LongestFirst for pairs (utils/truncation.rs), ported as it is written there
                boolean swap = n1 > n2;
                int s = Math.min(n1, n2), l = Math.max(n1, n2);
                l = s > budget ? s : Math.max(s, budget - s);
                if (s + l > budget) {
                    s = budget / 2;
                    l = s + budget % 2;
                }
                n1 = swap ? l : s;
                n2 = swap ? s : l;
                n1 = Math.min(n1, a.size());
                n2 = Math.min(n2, b.size());
            }
        }
        long[] ids = new long[maxLength];
        long[] mask = new long[maxLength];
        java.util.Arrays.fill(ids, padId);
        int k = 0;
        ids[k++] = clsId;
        for (int j = 0; j < n1; j++) ids[k++] = a.get(j);
        ids[k++] = sepId;
        if (b != null) {
            for (int j = 0; j < n2; j++) ids[k++] = b.get(j);
            ids[k++] = sepId;
        }
        for (int j = 0; j < k; j++) mask[j] = 1;
        return new Encoding(ids, mask, k);
    }

    /** The WordPiece ids of a text, without special tokens, truncation or padding. */
    public List<Integer> tokenize(String text) {
        List<Integer> out = new ArrayList<>();
        int start = 0;
        while (start <= text.length()) { // special tokens written in the text are kept whole
            int best = -1;
            String hit = null;
            for (String t : specialTokens) {
                int at = text.indexOf(t, start);
                if (at >= 0 && (best < 0 || at < best)) {
                    best = at;
                    hit = t;
                }
            }
            String piece = best < 0 ? text.substring(start) : text.substring(start, best);
            for (String word : preTokenize(normalize(piece))) wordPiece(word, out);
            if (best < 0) break;
            out.add(vocab.get(hit));
            start = best + hit.length();
        }
        return out;
    }

    /** BertNormalizer: clean text, CJK spacing, accent stripping, lower-casing (per code point). */
    public String normalize(String text) {
        StringBuilder b = new StringBuilder(text.length());
        text.codePoints().forEach(cp -> {
            if (cleanText) {
                if (cp == 0 || cp == 0xFFFD || isControl(cp)) return;
                if (isWhitespace(cp)) {
                    b.append(' ');
                    return;
                }
            }
            if (handleChineseChars && isChinese(cp)) b.append(' ').appendCodePoint(cp).append(' ');
            else b.appendCodePoint(cp);
        });
        String s = b.toString();
        if (stripAccents) {
            String nfd = Normalizer.normalize(s, Normalizer.Form.NFD);
            StringBuilder c = new StringBuilder(nfd.length());
            nfd.codePoints().filter(cp -> Character.getType(cp) != Character.NON_SPACING_MARK).forEach(c::appendCodePoint);
            s = c.toString();
        }
        if (lowercase) {
            StringBuilder c = new StringBuilder(s.length());
            s.codePoints().forEach(cp -> {
                if (cp == 0x130) c.append("i\u0307"); // the one unconditional multi-character lower-case mapping
                else c.appendCodePoint(Character.toLowerCase(cp));
            });
            s = c.toString();
        }
        return s;
    }

    /** BertPreTokenizer: split on white space (removed) and punctuation (each its own word). */
    public static List<String> preTokenize(String text) {
        List<String> words = new ArrayList<>();
        StringBuilder cur = new StringBuilder();
        text.codePoints().forEach(cp -> {
            if (isUnicodeWhitespace(cp)) {
                flush(cur, words);
            } else if (isPunctuation(cp)) {
                flush(cur, words);
                words.add(new String(Character.toChars(cp)));
            } else {
                cur.appendCodePoint(cp);
            }
        });
        flush(cur, words);
        return words;
    }

    private static void flush(StringBuilder cur, List<String> words) {
        if (cur.length() > 0) {
            words.add(cur.toString());
            cur.setLength(0);
        }
    }

    private void wordPiece(String word, List<Integer> out) {
        int[] cps = word.codePoints().toArray();
        if (cps.length > maxInputCharsPerWord) {
            out.add(unkId);
            return;
        }
        List<Integer> pieces = new ArrayList<>();
        int start = 0;
        while (start < cps.length) {
            int end = cps.length;
            Integer found = null;
            while (start < end) {
                String sub = new String(cps, start, end - start);
                if (start > 0) sub = prefix + sub;
                Integer id = vocab.get(sub);
                if (id != null) {
                    found = id;
                    break;
                }
                end--;
            }
            if (found == null) {
                out.add(unkId);
                return;
            }
            pieces.add(found);
            start = end;
        }
        out.addAll(pieces);
    }

    static boolean isControl(int cp) {
        if (cp == '\t' || cp == '\n' || cp == '\r') return false;
        int t = Character.getType(cp);
        return t == Character.CONTROL || t == Character.FORMAT || t == Character.UNASSIGNED
                || t == Character.PRIVATE_USE || t == Character.SURROGATE;
    }

    static boolean isWhitespace(int cp) {
        return cp == '\t' || cp == '\n' || cp == '\r' || isUnicodeWhitespace(cp);
    }

    /** Unicode White_Space (Rust's char::is_whitespace). */
    static boolean isUnicodeWhitespace(int cp) {
        return (cp >= 0x09 && cp <= 0x0D) || cp == 0x85 || Character.isSpaceChar(cp);
    }

    static boolean isPunctuation(int cp) {
        if (cp < 128) return (cp >= 33 && cp <= 47) || (cp >= 58 && cp <= 64) || (cp >= 91 && cp <= 96) || (cp >= 123 && cp <= 126);
        switch (Character.getType(cp)) {
            case Character.CONNECTOR_PUNCTUATION:
            case Character.DASH_PUNCTUATION:
            case Character.START_PUNCTUATION:
            case Character.END_PUNCTUATION:
            case Character.INITIAL_QUOTE_PUNCTUATION:
            case Character.FINAL_QUOTE_PUNCTUATION:
            case Character.OTHER_PUNCTUATION:
                return true;
            default:
                return false;
        }
    }

    static boolean isChinese(int cp) {
        return (cp >= 0x4E00 && cp <= 0x9FFF) || (cp >= 0x3400 && cp <= 0x4DBF) || (cp >= 0x20000 && cp <= 0x2A6DF)
                || (cp >= 0x2A700 && cp <= 0x2B73F) || (cp >= 0x2B740 && cp <= 0x2B81F) || (cp >= 0x2B920 && cp <= 0x2CEAF)
                || (cp >= 0xF900 && cp <= 0xFAFF) || (cp >= 0x2F800 && cp <= 0x2FA1F);
    }
}
