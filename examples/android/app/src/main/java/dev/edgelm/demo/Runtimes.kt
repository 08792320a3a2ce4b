package dev.edgelm.demo

import ai.onnxruntime.OnnxTensor
import ai.onnxruntime.OrtEnvironment
import ai.onnxruntime.OrtSession
import dev.edgelm.core.BundleManifest
import dev.edgelm.core.EarlyExitCascade
import dev.edgelm.core.ModelRunner
import java.io.File
import java.nio.FloatBuffer
import java.nio.LongBuffer
import java.nio.file.Path
import org.pytorch.executorch.EValue
import org.pytorch.executorch.Module
import org.pytorch.executorch.Tensor
import org.tensorflow.lite.Interpreter

/** Opens an edgelm artifact in the runtime its manifest entry names: ExecuTorch, LiteRT or ONNX Runtime. */
object Runtimes {
    /** The runtimes of an artifact, by its manifest "runtime" field, as the app's menu shows them. */
    val LABELS = mapOf("executorch" to "ExecuTorch", "litert" to "LiteRT", "onnxruntime" to "ONNX Runtime")

    /**
     * Open an artifact; an early-exit cascade (its manifest entry has "cascade") opens as an [EarlyExitCascade]
     * over its segments, which answers from the first confident exit.
     */
    fun open(artifact: BundleManifest.Artifact, file: Path, threads: Int, output: String): ModelRunner {
        if (artifact.cascade != null) {
            return EarlyExitCascade.open(artifact, file.parent, { _, index, f, n -> openSegment(artifact, index, f, n) }, threads)
        }
        return when (artifact.runtime) {
            "executorch" -> ExecuTorchRunner(file.toFile(), threads)
            "litert" -> LiteRtRunner(file.toFile(), threads, artifact.seqBuckets, output)
            "onnxruntime" -> OrtRunner(file.toFile(), threads, output)
            else -> throw IllegalArgumentException("no runtime for ${artifact.runtime} in this app")
        }
    }

    /** Segment [index] of an early-exit cascade in the cascade's runtime (see [EarlyExitCascade]). */
    fun openSegment(artifact: BundleManifest.Artifact, index: Int, file: Path, threads: Int): EarlyExitCascade.SegmentRunner {
        val last = index == artifact.cascade.segments.size - 1
        val output = artifact.cascade.outputName
        return when (artifact.runtime) {
            "executorch" -> ExecuTorchSegment(file.toFile(), threads, last)
            "litert" -> LiteRtSegment(file.toFile(), threads, artifact.seqBuckets, output, index == 0, last)
            "onnxruntime" -> OrtSegment(file.toFile(), threads, output, last)
            else -> throw IllegalArgumentException("no runtime for ${artifact.runtime} in this app")
        }
    }

    /** Peak resident memory of this process in MB, from /proc/self/status (VmHWM), NaN if unreadable. */
    fun peakRssMb(): Double =
        runCatching {
            File("/proc/self/status").readLines().first { it.startsWith("VmHWM:") }
                .split(Regex("\\s+"))[1].toDouble() / 1024.0
        }.getOrDefault(Double.NaN)
}

/**
 * ExecuTorch's Android runtime (XNNPACK delegate in the AAR); int64 inputs [1, seq], any seq up to max_seq_len.
 * The program is memory-mapped, its thread pool sized before "forward" is loaded (re-sizing it after loading
 * invalidates the method), and "forward" is loaded here so that the load time includes it.
 */
class ExecuTorchRunner(file: File, threads: Int) : ModelRunner {
    private val module: Module = Module.load(file.absolutePath, Module.LOAD_MODE_MMAP, threads).also {
        it.loadMethod("forward")
    }

    override fun run(inputIds: LongArray, attentionMask: LongArray): FloatArray {
        val shape = longArrayOf(1, inputIds.size.toLong())
        val out = module.forward(EValue.from(Tensor.fromBlob(inputIds, shape)), EValue.from(Tensor.fromBlob(attentionMask, shape)))
        return out[0].toTensor().dataAsFloatArray
    }

    override fun versions(): Map<String, String> = mapOf("executorch-android" to BuildConfig.EXECUTORCH_VERSION)

    override fun close() = module.destroy()
}

/** LiteRT's interpreter (XNNPACK by default): int32 inputs, one signature per sequence bucket (seq_16 ...). */
class LiteRtRunner(file: File, threads: Int, private val buckets: List<Int>, private val output: String) : ModelRunner {
    private val interpreter = Interpreter(file, Interpreter.Options().setNumThreads(threads))

    override fun run(inputIds: LongArray, attentionMask: LongArray): FloatArray {
        val bucket = buckets.firstOrNull { it >= inputIds.size }
            ?: throw IllegalArgumentException("${inputIds.size} tokens is longer than the largest bucket ${buckets.last()}")
        val ids = Array(1) { IntArray(bucket) }
        val mask = Array(1) { IntArray(bucket) }
        for (k in inputIds.indices) {
            ids[0][k] = inputIds[k].toInt()
            mask[0][k] = attentionMask[k].toInt()
        }
        val signature = "seq_$bucket"
        val width = interpreter.getOutputTensorFromSignature(output, signature).shape()[1]
        val out = Array(1) { FloatArray(width) }
        interpreter.runSignature(mapOf("input_ids" to ids, "attention_mask" to mask), mapOf(output to out), signature)
        return out[0]
    }

    override fun versions(): Map<String, String> = mapOf("litert" to BuildConfig.LITERT_VERSION)

    override fun close() = interpreter.close()
}

/** ONNX Runtime Android (CPU execution provider): int64 inputs [1, seq]; external data files load from beside it. */
class OrtRunner(file: File, threads: Int, private val output: String) : ModelRunner {
    private val env: OrtEnvironment = OrtEnvironment.getEnvironment()
    private val session: OrtSession = env.createSession(
        file.absolutePath, OrtSession.SessionOptions().apply { setIntraOpNumThreads(threads) })

    override fun run(inputIds: LongArray, attentionMask: LongArray): FloatArray {
        val shape = longArrayOf(1, inputIds.size.toLong())
        OnnxTensor.createTensor(env, LongBuffer.wrap(inputIds), shape).use { ids ->
            OnnxTensor.createTensor(env, LongBuffer.wrap(attentionMask), shape).use { mask ->
                session.run(mapOf("input_ids" to ids, "attention_mask" to mask), setOf(output)).use { result ->
                    @Suppress("UNCHECKED_CAST")
                    return (result[0].value as Array<FloatArray>)[0]
                }
            }
        }
    }

    override fun versions(): Map<String, String> = mapOf("onnxruntime-android" to BuildConfig.ONNXRUNTIME_VERSION)

    override fun close() = session.close()
}

/**
 * Early-exit segments (see [EarlyExitCascade]): segment 0 takes int64 input ids [1, seq], later ones float32
 * hidden states [1, seq, hidden]; both take the mask; all but the last return (hidden_out, logits), in that
 * order, the last returns logits.
 */
private fun hiddenWidth(hidden: FloatArray, seq: Int): Int {
    require(seq > 0 && hidden.size % seq == 0) { "hidden states of ${hidden.size} floats do not split into $seq positions" }
    return hidden.size / seq
}

/** An ExecuTorch segment ("forward" loaded up front, as [ExecuTorchRunner]; the module freed if that fails). */
class ExecuTorchSegment(file: File, threads: Int, private val last: Boolean) : EarlyExitCascade.SegmentRunner {
    private val module: Module = Module.load(file.absolutePath, Module.LOAD_MODE_MMAP, threads).also {
        try {
            it.loadMethod("forward")
        } catch (e: Throwable) {
            it.destroy()
            throw e
        }
    }

    override fun run(inputIds: LongArray?, hiddenStates: FloatArray?, attentionMask: LongArray): EarlyExitCascade.Output {
        val seq = attentionMask.size.toLong()
        val first = if (inputIds != null) {
            Tensor.fromBlob(inputIds, longArrayOf(1, seq))
        } else {
            Tensor.fromBlob(hiddenStates!!, longArrayOf(1, seq, hiddenWidth(hiddenStates, attentionMask.size).toLong()))
        }
        val out = module.forward(EValue.from(first), EValue.from(Tensor.fromBlob(attentionMask, longArrayOf(1, seq))))
        return if (last) {
            EarlyExitCascade.Output(null, out[0].toTensor().dataAsFloatArray)
        } else {
            EarlyExitCascade.Output(out[0].toTensor().dataAsFloatArray, out[1].toTensor().dataAsFloatArray)
        }
    }

    override fun versions(): Map<String, String> = mapOf("executorch-android" to BuildConfig.EXECUTORCH_VERSION)

    override fun close() = module.destroy()
}

/**
 * A LiteRT segment: one signature per sequence bucket (seq_16 ...); the inputs are padded up to the bucket
 * (int32 ids and mask, or float32 hidden states with zero rows), the hidden states it returns lose that padding.
 */
class LiteRtSegment(
    file: File, threads: Int, private val buckets: List<Int>, private val output: String,
    private val first: Boolean, private val last: Boolean,
) : EarlyExitCascade.SegmentRunner {
    private val interpreter = Interpreter(file, Interpreter.Options().setNumThreads(threads))

    override fun run(inputIds: LongArray?, hiddenStates: FloatArray?, attentionMask: LongArray): EarlyExitCascade.Output {
        val seq = attentionMask.size
        require(buckets.isNotEmpty()) { "no seq_buckets in the manifest for this LiteRT segment" }
        val bucket = buckets.firstOrNull { it >= seq }
            ?: throw IllegalArgumentException("$seq tokens is longer than the largest bucket ${buckets.last()}")
        val mask = Array(1) { IntArray(bucket) }
        for (k in 0 until seq) mask[0][k] = attentionMask[k].toInt()
        val inputs: Map<String, Any> = if (first) {
            val ids = Array(1) { IntArray(bucket) }
            for (k in 0 until seq) ids[0][k] = inputIds!![k].toInt()
            mapOf("input_ids" to ids, "attention_mask" to mask)
        } else {
            val width = hiddenWidth(hiddenStates!!, seq)
            val hidden = Array(1) { Array(bucket) { FloatArray(width) } }
            for (t in 0 until seq) System.arraycopy(hiddenStates, t * width, hidden[0][t], 0, width)
            mapOf("hidden_states" to hidden, "attention_mask" to mask)
        }
        val signature = "seq_$bucket"
        val labels = interpreter.getOutputTensorFromSignature(output, signature).shape()[1]
        val logits = Array(1) { FloatArray(labels) }
        val outputs = mutableMapOf<String, Any>(output to logits)
        var hiddenOut: Array<Array<FloatArray>>? = null
        if (!last) {
            val shape = interpreter.getOutputTensorFromSignature("hidden_out", signature).shape()
            hiddenOut = Array(1) { Array(shape[1]) { FloatArray(shape[2]) } }
            outputs["hidden_out"] = hiddenOut
        }
        interpreter.runSignature(inputs, outputs, signature)
        val flat = hiddenOut?.let { h ->
            val width = h[0][0].size
            FloatArray(seq * width).also { f -> for (t in 0 until seq) System.arraycopy(h[0][t], 0, f, t * width, width) }
        }
        return EarlyExitCascade.Output(flat, logits[0])
    }

    override fun versions(): Map<String, String> = mapOf("litert" to BuildConfig.LITERT_VERSION)

    override fun close() = interpreter.close()
}

/**
 * An ONNX Runtime segment (CPU execution provider); outputs read by name. Its intra-op threads do not spin
 * while idle: each segment has its own pool, and a spinning pool would take the CPU from the next segment.
 */
class OrtSegment(file: File, threads: Int, private val output: String, private val last: Boolean) : EarlyExitCascade.SegmentRunner {
    private val env: OrtEnvironment = OrtEnvironment.getEnvironment()
    private val options = OrtSession.SessionOptions().apply {
        setIntraOpNumThreads(threads)
        addConfigEntry("session.intra_op.allow_spinning", "0")
    }
    private val session: OrtSession = try {
        env.createSession(file.absolutePath, options)
    } catch (e: Throwable) {
        options.close()
        throw e
    }

    override fun run(inputIds: LongArray?, hiddenStates: FloatArray?, attentionMask: LongArray): EarlyExitCascade.Output {
        val seq = attentionMask.size.toLong()
        val (name, first) = if (inputIds != null) {
            "input_ids" to OnnxTensor.createTensor(env, LongBuffer.wrap(inputIds), longArrayOf(1, seq))
        } else {
            val width = hiddenWidth(hiddenStates!!, attentionMask.size).toLong()
            "hidden_states" to OnnxTensor.createTensor(env, FloatBuffer.wrap(hiddenStates), longArrayOf(1, seq, width))
        }
        first.use {
            OnnxTensor.createTensor(env, LongBuffer.wrap(attentionMask), longArrayOf(1, seq)).use { mask ->
                val wanted = if (last) setOf(output) else setOf("hidden_out", output)
                session.run(mapOf(name to first, "attention_mask" to mask), wanted).use { result ->
                    @Suppress("UNCHECKED_CAST")
                    val logits = (result.get(output).get().value as Array<FloatArray>)[0]
                    val hidden = if (last) null else {
                        val h = result.get("hidden_out").get() as OnnxTensor
                        h.floatBuffer.let { b -> FloatArray(b.remaining()).also { b.get(it) } } // one copy
                    }
                    return EarlyExitCascade.Output(hidden, logits)
                }
            }
        }
    }

    override fun versions(): Map<String, String> = mapOf("onnxruntime-android" to BuildConfig.ONNXRUNTIME_VERSION)

    override fun close() {
        session.close()
        options.close()
    }
}
