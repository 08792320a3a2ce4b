plugins {
    alias(libs.plugins.android.application)
    alias(libs.plugins.kotlin.android)
}

// The edgelm bundle to ship: the `android` folder from `edgelm export --device pixel8 --bundle android`
// (it holds edgelm/manifest.json, the artifacts, vocab.txt, labels.json, golden.npz).
val edgelmBundle: String = providers.gradleProperty("edgelm.bundle").get()

android {
    namespace = "dev.edgelm.demo"
    compileSdk = 35

    defaultConfig {
        applicationId = "dev.edgelm.demo"
        minSdk = 26
        targetSdk = 35
        versionCode = 1
        versionName = "0.1.0"
        testInstrumentationRunner = "androidx.test.runner.AndroidJUnitRunner"
        buildConfigField("String", "EXECUTORCH_VERSION", "\"${libs.versions.executorch.get()}\"")
        buildConfigField("String", "LITERT_VERSION", "\"${libs.versions.litert.get()}\"")
        buildConfigField("String", "ONNXRUNTIME_VERSION", "\"${libs.versions.onnxruntime.get()}\"")
    }

    sourceSets["main"].assets.srcDir(file(edgelmBundle))

    androidResources {
        // models are memory-mapped from the installed copy; keep them uncompressed in the APK
        noCompress += listOf("pte", "ptd", "tflite", "onnx", "data", "npz")
    }

    buildFeatures {
        buildConfig = true
    }

    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions {
        jvmTarget = "17"
    }
}

dependencies {
    implementation(project(":edgelm-core"))
    implementation(libs.executorch.android)
    implementation(libs.litert)
    implementation(libs.onnxruntime.android)
    implementation(libs.androidx.appcompat)
    implementation(libs.material)
    androidTestImplementation(libs.androidx.test.runner)
    androidTestImplementation(libs.androidx.test.ext.junit)
    androidTestImplementation(libs.junit)
}
