package dev.edgelm.demo

import ai.onnxruntime.OnnxTensor
import ai.onnxruntime.OrtEnvironment
import ai.onnxruntime.OrtSession
import dev.edgelm.core.BundleManifest
import dev.edgelm.core.ModelRunner
import java.io.File
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

    fun open(artifact: BundleManifest.Artifact, file: Path, threads: Int, output: String): ModelRunner =
        when (artifact.runtime) {
            "executorch" -> ExecuTorchRunner(file.toFile(), threads)
            "litert" -> LiteRtRunner(file.toFile(), threads, artifact.seqBuckets, output)
            "onnxruntime" -> OrtRunner(file.toFile(), threads, output)
            else -> throw IllegalArgumentException("no runtime for ${artifact.runtime} in this app")
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
