package dev.edgelm.demo

import android.os.Build
import androidx.test.ext.junit.runners.AndroidJUnit4
import androidx.test.platform.app.InstrumentationRegistry
import dev.edgelm.core.BundleManifest
import dev.edgelm.core.GenerativeCheck
import dev.edgelm.core.OnDeviceCheck
import java.nio.file.Path
import java.nio.file.Paths
import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Test
import org.junit.runner.RunWith

/**
 * The on-device accuracy check: run the golden set (and an eval set) through every artifact of the bundle on
 * this phone, compare with the PyTorch fp32 reference, time it, and write the results JSON that
 * `edgelm validate --runner adb` pulls (schema edgelm-device-results/1).
 *
 * A text-generation bundle: every golden prompt decoded greedily from its exported token ids (ExecuTorch's
 * Module, LiteRT's signatures), token agreement with the reference, perplexity over the golden window,
 * prefill/decode tokens/s at the bundle's threads and at 1, peak RSS; the app's byte-level BPE tokenizer on the
 * bundle's tokenizer cases; and for each .pte the golden prompts as text through LlmModule (its own C++
 * tokenizer and loop): prompts it counts alike, continuations equal to the reference's text.
 *
 * Instrumentation arguments (all optional; `edgelm validate --runner adb` passes them):
 * bundle (a pushed bundle directory; default: the bundle in the APK's assets), artifacts (comma-separated
 * file names; default: all), threads, warmup (5), runs (20), eval (an .npz in the bundle directory with
 * input_ids/attention_mask or texts/labels), results (where to write the JSON; default: the bundle dir).
 *
 *     adb shell am instrument -w -e runs 50 dev.edgelm.demo.test/androidx.test.runner.AndroidJUnitRunner
 */
@RunWith(AndroidJUnit4::class)
class OnDeviceAccuracyTest {
    @Test
    fun goldenSetEvalSetAndLatency() {
        val args = InstrumentationRegistry.getArguments()
        val context = InstrumentationRegistry.getInstrumentation().targetContext
        val dir = args.getString("bundle")?.let { Paths.get(it) } ?: BundleStore.install(context)
        if (BundleManifest.load(dir).isGenerator) return generation(dir, args)
        val check = OnDeviceCheck(dir)
        val names = args.getString("artifacts")?.split(",")?.filter { it.isNotBlank() }
            ?: check.manifest.artifacts.map { it.file }
        val threads = args.getString("threads")?.toInt() ?: check.manifest.threads
        val warmup = args.getString("warmup")?.toInt() ?: 5
        val runs = args.getString("runs")?.toInt() ?: 20
        val eval = args.getString("eval")?.let { dir.resolve(it) }
        val out = args.getString("results")?.let { Paths.get(it) } ?: dir.resolve("edgelm-results.json")

        val opener = OnDeviceCheck.Opener { artifact, file, n -> Runtimes.open(artifact, file, n, check.manifest.output) }
        val memory = OnDeviceCheck.MemoryProbe { Runtimes.peakRssMb() }
        val entries = names.map { check.run(check.manifest.artifact(it), opener, threads, warmup, runs, eval, memory) }
        val doc = check.results(device(), entries)
        OnDeviceCheck.write(doc, out)

        // the JSON is written first: edgelm reads it whatever the verdict; then the verdict, for Android Studio
        val failed = entries.filter { it["error"] != null || (it["golden"] as Map<*, *>)["passed"] != true }
            .map { "${it["artifact"]}: ${it["error"] ?: (it["golden"] as Map<*, *>)["detail"]}" }
        assertTrue("artifacts failing on this phone: $failed", failed.isEmpty())
        val tokenization = doc["tokenization"] as Map<*, *>
        assertEquals("golden texts tokenized differently on the phone: $tokenization", 0, tokenization["mismatched"] ?: 0)
    }

    private fun device(): Map<String, Any> = linkedMapOf(
        "model" to Build.MODEL, "manufacturer" to Build.MANUFACTURER, "abi" to Build.SUPPORTED_ABIS[0],
        "sdk" to Build.VERSION.SDK_INT.toLong(),
        "app" to InstrumentationRegistry.getInstrumentation().targetContext.packageName)

    /** The generation check (see the class doc); the same instrumentation arguments, no eval set. */
    private fun generation(dir: Path, args: android.os.Bundle) {
        val check = GenerativeCheck(dir)
        val names = args.getString("artifacts")?.split(",")?.filter { it.isNotBlank() }
            ?: check.manifest.artifacts.map { it.file }
        val threads = args.getString("threads")?.toInt() ?: check.manifest.threads
        val warmup = args.getString("warmup")?.toInt() ?: 5
        val runs = args.getString("runs")?.toInt() ?: 20
        val out = args.getString("results")?.let { Paths.get(it) } ?: dir.resolve("edgelm-results.json")
        val memory = OnDeviceCheck.MemoryProbe { Runtimes.peakRssMb() }
        val opener = GenerativeCheck.Opener { artifact, file, n -> Decoders.open(artifact, file, n) }
        val entries = names.map { check.run(check.manifest.artifact(it), opener, threads, warmup, runs, memory) }
        val texts = names.map { check.manifest.artifact(it) }.filter { it.runtime == "executorch" }.map { a ->
            runCatching {
                LlmModuleText(dir.resolve(a.file).toFile(), dir.resolve("tokenizer.json").toFile(), check.tokenizer)
                    .use { check.textCheck(it, "LlmModule ${a.file}") }
            }.getOrElse { e -> linkedMapOf<String, Any?>("runtime" to "LlmModule ${a.file}", "error" to "${e.javaClass.simpleName}: ${e.message}") }
        }
        val doc = check.results(device(), entries, texts)
        OnDeviceCheck.write(doc, out)

        val failed = entries.filter { it["error"] != null || (it["golden"] as Map<*, *>)["passed"] != true }
            .map { "${it["artifact"]}: ${it["error"] ?: (it["golden"] as Map<*, *>)["detail"]}" }
        assertTrue("decoders failing on this phone: $failed", failed.isEmpty())
        val tokenization = doc["tokenization"] as Map<*, *>
        assertEquals("the app's tokenizer differs from Hugging Face's: $tokenization", 0, tokenization["mismatched"])
    }
}
