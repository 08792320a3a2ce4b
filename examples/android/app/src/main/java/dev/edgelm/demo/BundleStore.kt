package dev.edgelm.demo

import android.content.Context
import dev.edgelm.core.BundleManifest
import java.io.File
import java.io.IOException
import java.nio.file.Path

/** The edgelm bundle the APK carries in assets/edgelm/, installed into the app's files directory. */
object BundleStore {
    const val ASSET_DIR = "edgelm"

    /**
     * Copy assets/edgelm/ to filesDir/edgelm/ (again only when the manifest changed), then check every file's
     * sha256 against the manifest. @throws IOException when the APK has no bundle or a file does not match.
     */
    fun install(context: Context): Path {
        val names = context.assets.list(ASSET_DIR).orEmpty()
        if ("manifest.json" !in names) {
            throw IOException("this APK has no edgelm bundle: build it with -Pedgelm.bundle=<dist/DEVICE/android>")
        }
        val dest = File(context.filesDir, ASSET_DIR)
        val manifest = context.assets.open("$ASSET_DIR/manifest.json").use { it.readBytes() }
        val installed = File(dest, "manifest.json")
        if (!installed.isFile || !installed.readBytes().contentEquals(manifest)) {
            dest.deleteRecursively()
            dest.mkdirs()
            for (name in names) {
                context.assets.open("$ASSET_DIR/$name").use { input ->
                    File(dest, "$name.partial").outputStream().use { input.copyTo(it) }
                }
                File(dest, "$name.partial").renameTo(File(dest, name))
            }
        }
        val problems = BundleManifest.load(dest.toPath()).verify(dest.toPath())
        if (problems.isNotEmpty()) throw IOException("bundle files do not match the manifest: ${problems.joinToString("; ")}")
        return dest.toPath()
    }
}
