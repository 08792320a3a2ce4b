package dev.edgelm.core;

import java.util.Map;

/**
 * One loaded artifact in its runtime (ExecuTorch, LiteRT or ONNX Runtime on Android; the app implements it).
 * {@link #run} takes one sequence: int64 {@code inputIds} and {@code attentionMask} of the same length
 * (1..max_seq_len, padding already trimmed; a LiteRT runner pads up to its signature bucket) and returns the
 * float32 output row ([num_labels] logits or [hidden] embeddings).
 */
public interface ModelRunner extends AutoCloseable {
    float[] run(long[] inputIds, long[] attentionMask) throws Exception;

    /** Runtime name to version, for the results JSON (e.g. {"onnxruntime-android": "1.22.0"}). */
    Map<String, String> versions();

    @Override
    default void close() throws Exception {}
}
