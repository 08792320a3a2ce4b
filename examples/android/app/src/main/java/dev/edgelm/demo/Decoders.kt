package dev.edgelm.demo

import dev.edgelm.core.BundleManifest
import dev.edgelm.core.ByteLevelBpeTokenizer
import dev.edgelm.core.GenerativeCheck
import dev.edgelm.core.Generation
import dev.edgelm.core.LlmStats
import java.io.File
import java.nio.Buffer
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.nio.file.Path
import org.pytorch.executorch.EValue
import org.pytorch.executorch.Module
import org.pytorch.executorch.Tensor
import org.pytorch.executorch.extension.llm.LlmCallback
import org.pytorch.executorch.extension.llm.LlmModule
import org.tensorflow.lite.Interpreter

/** Opens a text-generation bundle's decoders: ExecuTorch (.pte) and LiteRT (.tflite). */
object Decoders {
    fun open(artifact: BundleManifest.Artifact, file: Path, threads: Int): Generation.Decoder =
        when (artifact.runtime) {
            "executorch" -> ExecuTorchDecoder(file.toFile(), threads, artifact.maxSeqLen)
            "litert" -> LiteRtDecoder(file.toFile(), threads, artifact.signatures)
            else -> throw IllegalArgumentException("no decoder runtime for ${artifact.runtime} in this app")
        }
}

/**
 * An ExecuTorch decoder through the plain Module API: "forward" takes tokens int64 [1, n] and input_pos int64
 * [1] and returns the last position's logits; the KV cache is the program's mutable buffers (edgelm's
 * exporters/decoder.py writes it so). Used for the golden check, which needs token ids, not text.
 */
class ExecuTorchDecoder(file: File, threads: Int, private val context: Int) : Generation.Decoder {
    private val module: Module = Module.load(file.absolutePath, Module.LOAD_MODE_MMAP, threads).also {
        it.loadMethod("forward")
    }

    override fun forward(tokens: IntArray, pos: Int): Array<FloatArray> {
        val ids = LongArray(tokens.size) { tokens[it].toLong() }
        val out = module.forward(
            EValue.from(Tensor.fromBlob(ids, longArrayOf(1, ids.size.toLong()))),
            EValue.from(Tensor.fromBlob(longArrayOf(pos.toLong()), longArrayOf(1))),
        )[0].toTensor()
        val logits = out.dataAsFloatArray
        val vocab = out.shape().last().toInt()
        return arrayOf(logits.copyOfRange(logits.size - vocab, logits.size))
    }

    override fun fullLogits() = false

    override fun maxContext() = context

    override fun versions(): Map<String, String> = mapOf("executorch-android" to BuildConfig.EXECUTORCH_VERSION)

    override fun close() = module.destroy()
}

/**
 * A LiteRT decoder (litert-torch's generative layout): prefill_N signatures (logits for every position) and a
 * decode signature, the KV cache (kv_cache_k_i / kv_cache_v_i) passed in and returned by every signature.
 * The interpreter copies inputs in and outputs out, so the cache lives in two sets of direct buffers that swap
 * after each call: two copies of the whole cache per call, which the host's runner (CompiledModel, the cache
 * updated in place) does not make, so decode tokens/s here is below what the runtime can do. Prompts are padded into the smallest prefill signature that holds them, longer ones chunked.
 */
class LiteRtDecoder(file: File, threads: Int, signatures: List<String>) : Generation.Decoder {
    private val interpreter = Interpreter(file, Interpreter.Options().setNumThreads(threads))
    private val prefill = signatures.mapNotNull { it.removePrefix("prefill_").toIntOrNull() }.sorted()
    private val kvNames = interpreter.getSignatureInputs("decode").filter { it.startsWith("kv_cache_") }.sorted()
    private val kvShapes = kvNames.associateWith { interpreter.getInputTensorFromSignature(it, "decode").shape() }
    private var kvIn = buffers()
    private var kvOut = buffers()
    private val context = kvShapes.getValue(kvNames[0])[1]
    private val vocab = interpreter.getOutputTensorFromSignature("logits", "decode").shape().last()

    private fun buffers(): Map<String, ByteBuffer> = kvNames.associateWith { name ->
        ByteBuffer.allocateDirect(interpreter.getInputTensorFromSignature(name, "decode").numBytes())
            .order(ByteOrder.nativeOrder())
    }

    private fun run(signature: String, tokens: IntArray, pos: Int): Array<FloatArray> {
        val n = tokens.size
        val inputs = HashMap<String, Any>()
        inputs["tokens"] = arrayOf(tokens)
        inputs["input_pos"] = IntArray(n) { pos + it }
        val outputs = HashMap<String, Any>()
        val logits = Array(1) { Array(n) { FloatArray(vocab) } }
        outputs["logits"] = logits
        for (name in kvNames) {
            inputs[name] = kvIn.getValue(name).also { (it as Buffer).rewind() }
            outputs[name] = kvOut.getValue(name).also { (it as Buffer).rewind() }
        }
        interpreter.runSignature(inputs, outputs, signature)
        kvIn = kvOut.also { kvOut = kvIn }
        return logits[0]
    }

    override fun forward(tokens: IntArray, pos: Int): Array<FloatArray> {
        if (pos == 0) {
            val zeros = ByteArray(1 shl 16)
            for (b in kvIn.values) {
                (b as Buffer).rewind()
                while (b.hasRemaining()) b.put(zeros, 0, minOf(zeros.size, b.remaining()))
            }
        }
        val rows = ArrayList<FloatArray>()
        var start = 0
        while (start < tokens.size) {
            val rest = tokens.size - start
            val at = pos + start
            val fits = prefill.filter { at + it <= context }
            if (rest == 1 || fits.isEmpty()) {
                rows += run("decode", intArrayOf(tokens[start]), at)
                start += 1
                continue
            }
            val size = fits.firstOrNull { it >= rest } ?: fits.last()
            val take = minOf(rest, size)
            val padded = IntArray(size)
            System.arraycopy(tokens, start, padded, 0, take)
            rows += run("prefill_$size", padded, at).take(take)
            start += take
        }
        return rows.toTypedArray()
    }

    override fun fullLogits() = true

    override fun maxContext() = context

    override fun versions(): Map<String, String> = mapOf("litert" to BuildConfig.LITERT_VERSION)

    override fun close() = interpreter.close()
}

/**
 * ExecuTorch's LlmModule: the runtime's own tokenizer (pytorch-tokenizers reading tokenizer.json) and
 * generation loop, greedy at temperature 0, streaming each piece of text to [onText]. A new conversation per
 * call (the runner's context is reset first). [tokenizer] counts the prompt's tokens to size the sequence.
 */
class LlmModuleText(pte: File, tokenizerJson: File, private val tokenizer: ByteLevelBpeTokenizer) :
    GenerativeCheck.TextGenerator {
    private val llm = LlmModule(pte.absolutePath, tokenizerJson.absolutePath, 0.0f).also { it.load() }
    @Volatile var onText: ((String) -> Unit)? = null

    override fun generate(prompt: String, maxNewTokens: Int): GenerativeCheck.TextResult {
        val text = StringBuilder()
        var runStats: Map<String, Any> = emptyMap()
        var failure: String? = null
        llm.resetContext()
        val seqLen = tokenizer.encode(prompt).size + maxNewTokens
        llm.generate(prompt, seqLen, object : LlmCallback {
            override fun onResult(result: String) {
                text.append(result)
                onText?.invoke(result)
            }

            override fun onStats(stats: String) {
                runStats = LlmStats.parse(stats)
            }

            override fun onError(errorCode: Int, message: String) {
                failure = "LlmModule error $errorCode: $message"
            }
        }, false)
        failure?.let { throw IllegalStateException(it) }
        return GenerativeCheck.TextResult(text.toString(), runStats)
    }

    fun stop() = llm.stop()

    override fun close() = llm.close()
}
