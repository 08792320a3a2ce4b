// Plain JVM library (no Android dependency): WordPiece tokenizer, manifest and checksum reading, golden
// comparison and the on-device check's results JSON. Tested with the JDK alone by ../jvm-test.sh.
plugins {
    `java-library`
}

java {
    sourceCompatibility = JavaVersion.VERSION_17
    targetCompatibility = JavaVersion.VERSION_17
}

// The tests need inputs that edgelm prepares (Hugging Face token ids, a tiny bundle): run them through the script.
tasks.register<Exec>("jvmTest") {
    group = "verification"
    description = "Runs examples/android/jvm-test.sh (needs python3 with edgelm installed)."
    workingDir = rootDir
    commandLine("bash", "jvm-test.sh")
}
