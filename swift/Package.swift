// swift-tools-version: 6.2
// SpeedQVLM: InternVL (`internvl_chat`) for MLX Swift's MLXVLM, to run speedq-mlx artifacts in
// iOS and macOS apps. See README.md. (mlx-swift-lm itself needs tools 6.2.)

import PackageDescription

let package = Package(
    name: "SpeedQVLM",
    platforms: [.macOS(.v14), .iOS(.v17)],
    products: [
        // the model, its processor and the registration with MLXVLM
        .library(name: "SpeedQVLM", targets: ["SpeedQVLM"]),
        // the example SwiftUI view (iOS and macOS)
        .library(name: "SpeedQVLMUI", targets: ["SpeedQVLMUI"]),
        // the example command-line tool
        .executable(name: "speedq-vlm", targets: ["SpeedQVLMCLI"]),
    ],
    dependencies: [
        .package(url: "https://github.com/ml-explore/mlx-swift", .upToNextMinor(from: "0.31.6")),
        // a main commit (3.31.4 + 114): the sources use API that no tag has yet (3.31.4 lacks
        // PrefillParameters and LanguageModel's prepare(_:cache:state:prefill:); 3.31.3 also
        // ropeOffset, applyRotaryPosition(_:to:offset:), addToolMetadata(to:for:)).
        // swift/api/mlx-swift-lm.api lists this commit's API (tests/swift/test_swift_api.py).
        .package(
            url: "https://github.com/ml-explore/mlx-swift-lm",
            revision: "14414441fa44f45eee35a61e9fa0bab577cf9734"),
        // tokenizer.json / chat_template.jinja loading (through MLXHuggingFace's macro)
        .package(url: "https://github.com/huggingface/swift-transformers", from: "1.3.0"),
    ],
    targets: [
        .target(
            name: "SpeedQVLM",
            dependencies: [
                .product(name: "MLX", package: "mlx-swift"),
                .product(name: "MLXNN", package: "mlx-swift"),
                .product(name: "MLXLMCommon", package: "mlx-swift-lm"),
                .product(name: "MLXVLM", package: "mlx-swift-lm"),
            ],
            // the contract list, read by the tests (Swift and Python), not by the library
            exclude: ["parameter_paths.json"]
        ),
        .target(
            name: "SpeedQVLMUI",
            dependencies: [
                "SpeedQVLM",
                .product(name: "MLXLMCommon", package: "mlx-swift-lm"),
                .product(name: "MLXVLM", package: "mlx-swift-lm"),
                .product(name: "MLXHuggingFace", package: "mlx-swift-lm"),
                .product(name: "Tokenizers", package: "swift-transformers"),
            ]
        ),
        .executableTarget(
            name: "SpeedQVLMCLI",
            dependencies: [
                "SpeedQVLM",
                .product(name: "MLXLMCommon", package: "mlx-swift-lm"),
                .product(name: "MLXVLM", package: "mlx-swift-lm"),
                .product(name: "MLXHuggingFace", package: "mlx-swift-lm"),
                .product(name: "Tokenizers", package: "swift-transformers"),
            ]
        ),
        .testTarget(
            name: "SpeedQVLMTests",
            dependencies: [
                "SpeedQVLM",
                .product(name: "MLX", package: "mlx-swift"),
                .product(name: "MLXNN", package: "mlx-swift"),
                .product(name: "MLXLMCommon", package: "mlx-swift-lm"),
                .product(name: "MLXVLM", package: "mlx-swift-lm"),
                .product(name: "MLXHuggingFace", package: "mlx-swift-lm"),
                .product(name: "Tokenizers", package: "swift-transformers"),
            ],
            // read at run time through #filePath, like mlx-swift-lm's own fixtures
            exclude: ["reference_cases.json"]
        ),
    ],
    swiftLanguageModes: [.v5]
)
