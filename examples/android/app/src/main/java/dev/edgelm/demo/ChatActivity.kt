package dev.edgelm.demo

import android.os.Bundle
import android.widget.ArrayAdapter
import android.widget.Button
import android.widget.EditText
import android.widget.ScrollView
import android.widget.Spinner
import android.widget.TextView
import androidx.appcompat.app.AppCompatActivity
import dev.edgelm.core.BundleManifest
import dev.edgelm.core.GenerativeCheck
import dev.edgelm.core.Generation
import java.nio.file.Path
import java.nio.file.Paths
import java.util.concurrent.CancellationException
import java.util.concurrent.Executors

/**
 * The chat screen of a text-generation bundle: type a message, pick a decoder (ExecuTorch through LlmModule,
 * or LiteRT through this app's byte-level BPE tokenizer and greedy loop), and watch the reply stream in, with
 * the time to first token and prefill/decode tokens/s under it. Each message is a new single-turn
 * conversation in the model's chat template (the bundle's chat prefix and suffix). Greedy decoding.
 */
class ChatActivity : AppCompatActivity() {
    private val worker = Executors.newSingleThreadExecutor()
    private lateinit var dir: Path
    private lateinit var check: GenerativeCheck
    private val texts = mutableMapOf<String, LlmModuleText>()
    private val decoders = mutableMapOf<String, Generation.Decoder>()
    @Volatile private var stopRequested = false
    @Volatile private var running: LlmModuleText? = null

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContentView(R.layout.activity_chat)
        val status = findViewById<TextView>(R.id.stats)
        findViewById<Button>(R.id.send).isEnabled = false
        status.text = getString(R.string.loading)
        worker.execute {
            try {
                // MainActivity installed and checked it already; started directly, install here
                dir = intent.getStringExtra(EXTRA_DIR)?.let { Paths.get(it) } ?: BundleStore.install(this)
                check = GenerativeCheck(dir)
                runOnUiThread { onBundleReady() }
            } catch (e: Throwable) {
                runOnUiThread { status.text = getString(R.string.load_failed, e.message) }
            }
        }
    }

    private fun label(a: BundleManifest.Artifact) =
        if (a.runtime == "executorch") "ExecuTorch LlmModule · ${a.file}" else "${Runtimes.LABELS[a.runtime] ?: a.runtime} · ${a.file}"

    private fun onBundleReady() {
        findViewById<Spinner>(R.id.artifact).adapter =
            ArrayAdapter(this, android.R.layout.simple_spinner_dropdown_item, check.manifest.artifacts.map(::label))
        findViewById<TextView>(R.id.stats).text = getString(R.string.chat_ready, check.manifest.device)
        findViewById<Button>(R.id.send).apply {
            isEnabled = true
            setOnClickListener { send() }
        }
        findViewById<Button>(R.id.stop).setOnClickListener {
            stopRequested = true
            running?.stop()
        }
    }

    private fun append(text: String) {
        val transcript = findViewById<TextView>(R.id.transcript)
        transcript.append(text)
        findViewById<ScrollView>(R.id.scroll).post { findViewById<ScrollView>(R.id.scroll).fullScroll(ScrollView.FOCUS_DOWN) }
    }

    private fun send() {
        val input = findViewById<EditText>(R.id.message)
        val message = input.text.toString().trim()
        if (message.isEmpty()) return
        input.setText("")
        val artifact = check.manifest.artifacts[findViewById<Spinner>(R.id.artifact).selectedItemPosition]
        val send = findViewById<Button>(R.id.send)
        send.isEnabled = false
        append(getString(R.string.you_said, message))
        stopRequested = false
        val prompt = check.chatPrompt(message)
        worker.execute {
            val line = try {
                val promptLen = check.tokenizer.encode(prompt).size
                val maxNew = minOf(MAX_NEW_TOKENS, artifact.maxSeqLen - promptLen - 1)
                when {
                    maxNew < 1 -> getString(R.string.too_long, promptLen, artifact.maxSeqLen)
                    artifact.runtime == "executorch" -> viaLlmModule(artifact, prompt, maxNew)
                    else -> viaDecoder(artifact, prompt, maxNew)
                }
            } catch (e: CancellationException) {
                getString(R.string.stopped)
            } catch (e: Throwable) {
                getString(R.string.run_failed, e.javaClass.simpleName, e.message)
            }
            runOnUiThread {
                append("\n\n")
                findViewById<TextView>(R.id.stats).text = line
                send.isEnabled = true
            }
        }
    }

    /** ExecuTorch: LlmModule tokenizes, prefills and decodes; its stats give TTFT and tokens/s. */
    private fun viaLlmModule(a: BundleManifest.Artifact, prompt: String, maxNew: Int): String {
        val llm = texts.getOrPut(a.file) {
            LlmModuleText(dir.resolve(a.file).toFile(), dir.resolve("tokenizer.json").toFile(), check.tokenizer)
        }
        llm.onText = { piece -> runOnUiThread { append(piece) } }
        running = llm
        val res = try { llm.generate(prompt, maxNew) } finally { running = null }
        val s = res.stats
        return getString(R.string.chat_stats, num(s["ttft_ms"]), num(s["prefill_tokens_per_s"]), num(s["decode_tokens_per_s"]),
            (s["generated_tokens"] as? Number)?.toInt() ?: 0)
    }

    /** LiteRT: this app's tokenizer and greedy loop over the decoder's signatures, text streamed per token. */
    private fun viaDecoder(a: BundleManifest.Artifact, prompt: String, maxNew: Int): String {
        val decoder = decoders.getOrPut(a.file) { Decoders.open(a, dir.resolve(a.file), check.manifest.threads) }
        val stream = check.tokenizer.streamDecoder()
        val r = Generation.generate(decoder, check.tokenizer.encode(prompt), maxNew, check.eos) { id ->
            if (stopRequested) throw CancellationException()
            if (id !in check.eos) {
                val piece = stream.push(id)
                if (piece.isNotEmpty()) runOnUiThread { append(piece) }
            }
        }
        val rest = stream.flush()
        if (rest.isNotEmpty()) runOnUiThread { append(rest) }
        return getString(R.string.chat_stats, r.ttftMs, r.prefillTokensPerS, r.decodeTokensPerS, r.tokens.size)
    }

    private fun num(v: Any?): Double = (v as? Number)?.toDouble() ?: Double.NaN

    override fun onDestroy() {
        stopRequested = true
        running?.stop()
        worker.execute {
            texts.values.forEach { runCatching { it.close() } }
            decoders.values.forEach { runCatching { it.close() } }
        }
        worker.shutdown()
        super.onDestroy()
    }

    companion object {
        const val MAX_NEW_TOKENS = 256
        /** The installed and checked bundle directory, from MainActivity. */
        const val EXTRA_DIR = "dev.edgelm.demo.BUNDLE_DIR"
    }
}
