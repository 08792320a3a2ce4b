package dev.edgelm.core;

import java.io.IOException;
import java.io.InputStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.Map;

/**
 * An edgelm Android bundle's {@code manifest.json} (schema {@value #SCHEMA}, written by
 * {@code edgelm export --bundle android}): the model, tokenizer settings, labels, golden set and, per artifact,
 * its runtime, sha256, signature and golden tolerance. {@link #verify(Path)} checks every file's sha256.
 */
public final class BundleManifest {
    public static final String SCHEMA = "edgelm-android-bundle/1";

    /** One artifact the app can run. */
    public static final class Artifact {
        public final String file, format, runtime, scheme, sha256, goldenReference;
        public final long sizeBytes;
        public final int maxSeqLen;
        /** LiteRT signature lengths (seq_16, seq_32, ...); empty for other runtimes. */
        public final List<Integer> seqBuckets;
        /** Companion files (ONNX external data, ExecuTorch .ptd): name and sha256. */
        public final List<String[]> companions;
        public final String inputDtype;
        /** Golden tolerance: min cosine, min top-1 agreement, max |error|, max accuracy drop (NaN: none). */
        public final double minCosine, minTop1, maxAbsError, maxAccuracyDrop, referenceAccuracy;
        /** Decoders' gates: share of golden prompts with every greedy token equal, perplexity ratio (NaN: none). */
        public final double minTokenAgreement, maxPerplexityRatio;
        /** A LiteRT decoder's signatures (prefill_32, ..., decode); empty for other artifacts. */
        public final List<String> signatures;
        /** An early-exit cascade's policy and segments (the artifact file is its .exits.json); null otherwise. */
        public final Cascade cascade;

        Artifact(Map<String, Object> m) {
            file = Json.str(m, "file");
            format = Json.str(m, "format");
            runtime = Json.str(m, "runtime");
            scheme = Json.str(m, "scheme");
            sha256 = Json.str(m, "sha256");
            goldenReference = m.containsKey("golden_reference") ? Json.str(m, "golden_reference") : "reference";
            sizeBytes = ((Number) m.get("size_bytes")).longValue();
            maxSeqLen = ((Number) m.get("max_seq_len")).intValue();
            List<Integer> buckets = new ArrayList<>();
            if (m.get("seq_buckets") != null)
                for (Object o : Json.arr(m.get("seq_buckets"), "seq_buckets")) buckets.add(((Number) o).intValue());
            seqBuckets = Collections.unmodifiableList(buckets);
            List<String[]> comps = new ArrayList<>();
            if (m.get("companions") != null)
                for (Object o : Json.arr(m.get("companions"), "companions")) {
                    Map<String, Object> c = Json.obj(o, "companion");
                    comps.add(new String[] {Json.str(c, "file"), Json.str(c, "sha256")});
                }
            companions = Collections.unmodifiableList(comps);
            List<Object> inputs = Json.arr(m.get("inputs"), file + " inputs");
            inputDtype = Json.str(Json.obj(inputs.get(0), "input"), "dtype");
            Map<String, Object> tol = Json.obj(m.get("tolerance"), file + " tolerance");
            minCosine = num(tol.get("min_cosine"));
            minTop1 = num(tol.get("min_top1_agreement"));
            maxAbsError = num(tol.get("max_abs_error"));
            maxAccuracyDrop = num(tol.get("max_accuracy_drop"));
            referenceAccuracy = num(m.get("reference_accuracy"));
            minTokenAgreement = num(tol.get("min_token_agreement"));
            maxPerplexityRatio = num(tol.get("max_perplexity_ratio"));
            List<String> sigs = new ArrayList<>();
            if (m.get("signatures") != null)
                for (Object o : Json.arr(m.get("signatures"), "signatures")) sigs.add((String) o);
            signatures = Collections.unmodifiableList(sigs);
            cascade = m.get("cascade") == null ? null : new Cascade(Json.obj(m.get("cascade"), file + " cascade"), file);
        }

        private static double num(Object o) {
            return o == null ? Double.NaN : ((Number) o).doubleValue();
        }
    }

    /** One segment of an early-exit cascade: its file (beside the manifest), sha256, encoder layers (1-based). */
    public static final class Segment {
        public final String file, sha256;
        public final int firstLayer, lastLayer;

        Segment(Map<String, Object> m) {
            file = Json.str(m, "file");
            sha256 = Json.str(m, "sha256");
            firstLayer = ((Number) m.get("first_layer")).intValue();
            lastLayer = ((Number) m.get("last_layer")).intValue();
            if (file.isEmpty() || file.contains("/") || file.contains("\\") || file.equals("..") || file.equals("."))
                throw new IllegalArgumentException("segment " + file + ": segment files are plain names beside the manifest");
        }
    }

    /**
     * An early-exit cascade's exit policy (DeeBERT, Xin et al. ACL 2020): after segment k its exit's confidence,
     * {@code max_prob} (largest softmax probability; exits when &gt;= threshold) or {@code entropy} (of the
     * softmax, nats; exits when &lt;= threshold); the last segment always answers.
     */
    public static final class Cascade {
        public final String confidence, outputName;
        public final double threshold;
        public final int numLayers;
        public final List<Segment> segments;

        Cascade(Map<String, Object> m, String artifact) {
            confidence = Json.str(m, "confidence");
            if (!confidence.equals("max_prob") && !confidence.equals("entropy"))
                throw new IllegalArgumentException(artifact + ": unknown exit confidence " + confidence + " (max_prob or entropy)");
            outputName = Json.str(m, "output_name");
            threshold = ((Number) m.get("threshold")).doubleValue();
            numLayers = ((Number) m.get("num_layers")).intValue();
            List<Segment> segs = new ArrayList<>();
            for (Object o : Json.arr(m.get("segments"), artifact + " segments")) segs.add(new Segment(Json.obj(o, "segment")));
            if (segs.isEmpty()) throw new IllegalArgumentException(artifact + ": a cascade without segments");
            segments = Collections.unmodifiableList(segs);
        }
    }

    public final String device, kind, output, goldenFile, goldenSha256;
    public final int threads;
    public final List<String> labels;
    public final Map<String, Object> tokenizer;
    /** A text-generation bundle's settings (new_tokens, bos_id, eos_ids, context_length, chat, ...); else null. */
    public final Map<String, Object> generation;
    public final List<Artifact> artifacts;

    private BundleManifest(Map<String, Object> m) {
        Object schema = m.get("schema");
        if (!SCHEMA.equals(schema))
            throw new IllegalArgumentException("not an edgelm Android bundle manifest (schema " + schema + ", want "
                    + SCHEMA + "): export with `edgelm export --bundle android`");
        device = Json.str(Json.obj(m.get("device"), "device"), "name");
        Map<String, Object> model = Json.obj(m.get("model"), "model");
        kind = Json.str(model, "kind");
        output = Json.str(model, "output");
        Map<String, Object> golden = Json.obj(m.get("golden"), "golden");
        goldenFile = Json.str(golden, "file");
        goldenSha256 = Json.str(golden, "sha256");
        threads = m.get("threads") == null ? 1 : ((Number) m.get("threads")).intValue();
        List<String> l = new ArrayList<>();
        if (m.get("labels") != null) for (Object o : Json.arr(m.get("labels"), "labels")) l.add((String) o);
        labels = Collections.unmodifiableList(l);
        tokenizer = Json.obj(m.get("tokenizer"), "tokenizer");
        generation = m.get("generation") == null ? null : Json.obj(m.get("generation"), "generation");
        List<Artifact> arts = new ArrayList<>();
        for (Object o : Json.arr(m.get("artifacts"), "artifacts")) arts.add(new Artifact(Json.obj(o, "artifact")));
        if (arts.isEmpty()) throw new IllegalArgumentException("the bundle lists no artifacts");
        artifacts = Collections.unmodifiableList(arts);
    }

    /** Parse manifest JSON text. @throws IllegalArgumentException for malformed JSON or another schema. */
    public static BundleManifest parse(String json) {
        return new BundleManifest(Json.obj(Json.parse(json), "manifest"));
    }

    /** Read {@code dir/manifest.json}. */
    public static BundleManifest load(Path dir) throws IOException {
        return parse(new String(Files.readAllBytes(dir.resolve("manifest.json")), StandardCharsets.UTF_8));
    }

    public Artifact artifact(String file) {
        for (Artifact a : artifacts) if (a.file.equals(file)) return a;
        throw new IllegalArgumentException(file + " is not an artifact of this bundle");
    }

    public boolean isClassifier() {
        return "classifier".equals(kind);
    }

    /** A text-generation bundle (causal LM decoders, byte-level BPE tokenizer, golden prompts). */
    public boolean isGenerator() {
        return generation != null;
    }

    /**
     * Check the sha256 of the golden set, the vocabulary or tokenizer.json, a generative bundle's prompts and
     * tokenizer cases, and every artifact with its companions.
     * @return one line per missing or changed file; empty when all match
     */
    public List<String> verify(Path dir) throws IOException {
        List<String[]> files = new ArrayList<>();
        files.add(new String[] {goldenFile, goldenSha256});
        if (tokenizer.get("vocab_sha256") != null)
            files.add(new String[] {(String) tokenizer.getOrDefault("vocab", "vocab.txt"), (String) tokenizer.get("vocab_sha256")});
        if (tokenizer.get("file") != null)
            files.add(new String[] {(String) tokenizer.get("file"), (String) tokenizer.get("sha256")});
        if (generation != null) {
            files.add(new String[] {(String) generation.get("prompts_file"), (String) generation.get("prompts_sha256")});
            files.add(new String[] {(String) generation.get("tokenizer_cases_file"), (String) generation.get("tokenizer_cases_sha256")});
        }
        for (Artifact a : artifacts) {
            files.add(new String[] {a.file, a.sha256});
            files.addAll(a.companions);
        }
        return check(dir, files);
    }

    /** Check the sha256 of one artifact and its companions only. @return one line per missing or changed file */
    public List<String> verifyArtifact(Path dir, Artifact a) throws IOException {
        List<String[]> files = new ArrayList<>();
        files.add(new String[] {a.file, a.sha256});
        files.addAll(a.companions);
        return check(dir, files);
    }

    /** {@link #verifyArtifact}, as an exception. @throws IllegalStateException a file missing or changed */
    public void checkArtifact(Path dir, Artifact a) throws IOException {
        List<String> bad = verifyArtifact(dir, a);
        if (!bad.isEmpty()) throw new IllegalStateException("checksum: " + String.join("; ", bad));
    }

    private static List<String> check(Path dir, List<String[]> files) throws IOException {
        List<String> problems = new ArrayList<>();
        for (String[] f : files) {
            Path p = dir.resolve(f[0]);
            if (!Files.isRegularFile(p)) problems.add(f[0] + ": missing");
            else {
                String got = sha256(p);
                if (!got.equals(f[1])) problems.add(f[0] + ": sha256 " + got.substring(0, 12) + " != manifest " + f[1].substring(0, 12));
            }
        }
        return problems;
    }

    /** Lower-case hex sha256 of a file. */
    public static String sha256(Path file) throws IOException {
        MessageDigest md;
        try {
            md = MessageDigest.getInstance("SHA-256");
        } catch (NoSuchAlgorithmException e) {
            throw new IllegalStateException(e);
        }
        try (InputStream in = Files.newInputStream(file)) {
            byte[] buf = new byte[1 << 16];
            int n;
            while ((n = in.read(buf)) > 0) md.update(buf, 0, n);
        }
        StringBuilder b = new StringBuilder();
        for (byte x : md.digest()) b.append(String.format("%02x", x));
        return b.toString();
    }
}
