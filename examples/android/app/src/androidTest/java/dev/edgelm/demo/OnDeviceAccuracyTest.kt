package dev.edgelm.demo

import android.os.Build
import androidx.test.ext.junit.runners.AndroidJUnit4
import androidx.test.platform.app.InstrumentationRegistry
import dev.edgelm.core.OnDeviceCheck
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
        val device = linkedMapOf<String, Any>(
            "model" to Build.MODEL, "manufacturer" to Build.MANUFACTURER, "abi" to Build.SUPPORTED_ABIS[0],
            "sdk" to Build.VERSION.SDK_INT.toLong(), "app" to context.packageName)
        val doc = check.results(device, entries)
        OnDeviceCheck.write(doc, out)

        // the JSON is written first: edgelm reads it whatever the verdict; then the verdict, for Android Studio
        val failed = entries.filter { it["error"] != null || (it["golden"] as Map<*, *>)["passed"] != true }
            .map { "${it["artifact"]}: ${it["error"] ?: (it["golden"] as Map<*, *>)["detail"]}" }
        assertTrue("artifacts failing on this phone: $failed", failed.isEmpty())
        val tokenization = doc["tokenization"] as Map<*, *>
        assertEquals("golden texts tokenized differently on the phone: $tokenization", 0, tokenization["mismatched"] ?: 0)
    }
}
