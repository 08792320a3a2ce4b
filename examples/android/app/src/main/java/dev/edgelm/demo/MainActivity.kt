package dev.edgelm.demo

import android.content.Intent
import android.os.Bundle
import android.view.View
import android.widget.ArrayAdapter
import android.widget.Button
import android.widget.EditText
import android.widget.Spinner
import android.widget.TextView
import androidx.appcompat.app.AppCompatActivity
import dev.edgelm.core.BundleManifest
import dev.edgelm.core.EarlyExitCascade
import dev.edgelm.core.Golden
import dev.edgelm.core.ModelRunner
import dev.edgelm.core.WordPieceTokenizer
import java.nio.file.Path
import java.util.concurrent.Executors
import kotlin.math.exp
import kotlin.math.sqrt

/**
 * Type a sentence, pick a runtime (the bundle's artifacts: ExecuTorch, LiteRT, ONNX Runtime), and see the
 * label and its probability, or for an embedding model the cosine similarity of two sentences, with the
 * measured latency of the model call (tokenization excluded; it is shown apart); an early-exit cascade also says
 * which layer's exit answered. A text-generation bundle
 * opens [ChatActivity] instead.
 */
class MainActivity : AppCompatActivity() {
    private val worker = Executors.newSingleThreadExecutor()
    private lateinit var dir: Path
    private lateinit var manifest: BundleManifest
    private lateinit var tokenizer: WordPieceTokenizer
    private val runners = mutableMapOf<String, ModelRunner>()

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContentView(R.layout.activity_main)
        val status = findViewById<TextView>(R.id.result)
        val run = findViewById<Button>(R.id.run)
        run.isEnabled = false
        status.text = getString(R.string.loading)
        worker.execute {
            try {
                dir = BundleStore.install(this)
                manifest = BundleManifest.load(dir)
                if (manifest.isGenerator) { // a text-generation bundle: the chat screen
                    runOnUiThread {
                        startActivity(Intent(this, ChatActivity::class.java).putExtra(ChatActivity.EXTRA_DIR, dir.toString()))
                        finish()
                    }
                    return@execute
                }
                tokenizer = WordPieceTokenizer.load(dir, manifest.tokenizer)
                runOnUiThread { onBundleReady() }
            } catch (e: Exception) {
                runOnUiThread { status.text = getString(R.string.load_failed, e.message) }
            }
        }
    }

    private fun onBundleReady() {
        val choices = manifest.artifacts.map { "${Runtimes.LABELS[it.runtime] ?: it.runtime} · ${it.file}" }
        findViewById<Spinner>(R.id.artifact).adapter =
            ArrayAdapter(this, android.R.layout.simple_spinner_dropdown_item, choices)
        val embedding = !manifest.isClassifier
        findViewById<EditText>(R.id.text2).visibility = if (embedding) View.VISIBLE else View.GONE
        findViewById<TextView>(R.id.result).text = getString(R.string.ready, manifest.device, manifest.kind)
        findViewById<Button>(R.id.run).apply {
            isEnabled = true
            setOnClickListener { runModel() }
        }
    }

    private fun runModel() {
        val artifact = manifest.artifacts[findViewById<Spinner>(R.id.artifact).selectedItemPosition]
        val text1 = findViewById<EditText>(R.id.text1).text.toString()
        val text2 = findViewById<EditText>(R.id.text2).text.toString()
        val result = findViewById<TextView>(R.id.result)
        result.text = getString(R.string.running)
        worker.execute {
            val message = try {
                val runner = runners.getOrPut(artifact.file) {
                    Runtimes.open(artifact, dir.resolve(artifact.file), manifest.threads, manifest.output)
                }
                if (manifest.isClassifier) classify(runner, text1) else similarity(runner, text1, text2)
            } catch (e: Exception) {
                getString(R.string.run_failed, e.javaClass.simpleName, e.message)
            }
            runOnUiThread { result.text = message }
        }
    }

    /** Run one text: (output row, model milliseconds, tokenizer milliseconds). */
    private fun infer(runner: ModelRunner, text: String): Triple<FloatArray, Double, Double> {
        val t0 = System.nanoTime()
        val enc = tokenizer.encode(text)
        val row = Golden.trimmed(enc.inputIds, enc.attentionMask)
        val t1 = System.nanoTime()
        val out = runner.run(row[0], row[1])
        val t2 = System.nanoTime()
        return Triple(out, (t2 - t1) / 1e6, (t1 - t0) / 1e6)
    }

    private fun classify(runner: ModelRunner, text: String): String {
        val (logits, ms, tokMs) = infer(runner, text)
        val max = logits.maxOrNull() ?: 0f
        val exps = logits.map { exp((it - max).toDouble()) }
        val best = Golden.argmax(logits)
        val label = manifest.labels.getOrNull(best) ?: "class $best"
        val line = getString(R.string.classified, label, exps[best] / exps.sum(), ms, tokMs)
        if (runner !is EarlyExitCascade) return line
        val policy = runner.policy()
        if (runner.lastExitLayer() == policy.numLayers) return line + "\n" + getString(R.string.no_exit, policy.numLayers)
        val op = if (policy.confidence == "max_prob") ">=" else "<="
        return line + "\n" + getString(R.string.exited, runner.lastExitLayer(), policy.numLayers, policy.confidence, op, runner.threshold())
    }

    private fun similarity(runner: ModelRunner, a: String, b: String): String {
        val (ea, msA, tokA) = infer(runner, a)
        val (eb, msB, tokB) = infer(runner, b)
        var dot = 0.0
        var na = 0.0
        var nb = 0.0
        for (k in ea.indices) {
            dot += ea[k] * eb[k]
            na += ea[k] * ea[k]
            nb += eb[k] * eb[k]
        }
        return getString(R.string.similar, dot / (sqrt(na) * sqrt(nb)), (msA + msB) / 2, (tokA + tokB) / 2)
    }

    override fun onDestroy() {
        worker.execute { runners.values.forEach { runCatching { it.close() } } }
        worker.shutdown()
        super.onDestroy()
    }
}
