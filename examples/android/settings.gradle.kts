// The edgelm Android demo app: loads an edgelm bundle (edgelm export --bundle android), tokenizes with the
// plain-JVM WordPiece tokenizer in :edgelm-core, runs the model with ExecuTorch, LiteRT or ONNX Runtime.
pluginManagement {
    repositories {
        google()
        mavenCentral()
        gradlePluginPortal()
    }
}
dependencyResolutionManagement {
    repositoriesMode.set(RepositoriesMode.FAIL_ON_PROJECT_REPOS)
    repositories {
        google()
        mavenCentral()
    }
}
rootProject.name = "edgelm-demo"
include(":app", ":edgelm-core")
