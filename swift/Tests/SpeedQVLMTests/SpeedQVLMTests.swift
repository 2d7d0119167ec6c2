// Swift side of the speedq-mlx artifact contract (the Python side is tests/test_swift_contract.py).
// Runs on a Mac with Xcode: `cd swift && swift test`. With SPEEDQ_ARTIFACT=<folder of a
// speedq-mlx artifact> it also loads that artifact through VLMModelFactory and generates.

import CoreImage
import Foundation
import MLX
import MLXHuggingFace
import MLXLMCommon
import MLXNN
import MLXVLM
import Tokenizers
import XCTest

@testable import SpeedQVLM

/// swift/ (this file is swift/Tests/SpeedQVLMTests/SpeedQVLMTests.swift)
private let packageRoot = URL(fileURLWithPath: #filePath)
    .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

private func readJSON(_ relativePath: String) throws -> [String: Any] {
    let data = try Data(contentsOf: packageRoot.appendingPathComponent(relativePath))
    return try XCTUnwrap(JSONSerialization.jsonObject(with: data) as? [String: Any])
}

/// The expansion rule of Sources/SpeedQVLM/parameter_paths.json ("expansion.rule").
enum ParameterPaths {
    static func value(_ config: [String: Any], _ dotted: String) -> Any? {
        var parts = dotted.split(separator: ".").map(String.init)
        var node: Any? = config
        if parts.first == "llm_config", config["llm_config"] == nil {
            parts[0] = "text_config"
        }
        for part in parts {
            node = (node as? [String: Any])?[part]
        }
        return node
    }

    static func holds(_ when: [String: Any]?, _ config: [String: Any]) -> Bool {
        guard let when, let key = when["key"] as? String else { return true }
        let actual = value(config, key) ?? when["default"]
        if let expected = when["equals"] as? String {
            return (actual as? String) == expected
        }
        return (actual as? Bool) == (when["equals"] as? Bool)
    }

    static func expand(_ groups: [[String: Any]], _ config: [String: Any]) -> Set<String> {
        let visionLayers = value(config, "vision_config.num_hidden_layers") as? Int ?? 0
        let textLayers = value(config, "llm_config.num_hidden_layers") as? Int ?? 0
        var out = Set<String>()
        for group in groups where holds(group["when"] as? [String: Any], config) {
            for path in group["paths"] as? [String] ?? [] {
                if path.contains("{v}") {
                    for i in 0 ..< visionLayers {
                        out.insert(path.replacingOccurrences(of: "{v}", with: "\(i)"))
                    }
                } else if path.contains("{t}") {
                    for i in 0 ..< textLayers {
                        out.insert(path.replacingOccurrences(of: "{t}", with: "\(i)"))
                    }
                } else {
                    out.insert(path)
                }
            }
        }
        return out
    }

    static func parameters(_ config: [String: Any]) throws -> Set<String> {
        let list = try readJSON("Sources/SpeedQVLM/parameter_paths.json")
        return expand(try XCTUnwrap(list["parameters"] as? [[String: Any]]), config)
    }

    static func quantizable(_ config: [String: Any]) throws -> Set<String> {
        let list = try readJSON("Sources/SpeedQVLM/parameter_paths.json")
        let section = try XCTUnwrap(list["quantizable_modules"] as? [String: Any])
        return expand(try XCTUnwrap(section["groups"] as? [[String: Any]]), config)
    }
}

/// A tiny internvl_chat config.json (the layout of tests/conftest.py's tiny checkpoint).
private func tinyConfig(variant: Bool = false) -> [String: Any] {
    var vision: [String: Any] = [
        "model_type": "intern_vit_6b", "hidden_size": 128, "intermediate_size": 256,
        "num_attention_heads": 4, "num_hidden_layers": 2, "image_size": 56, "patch_size": 14,
        "qkv_bias": true, "qk_normalization": false, "norm_type": "layer_norm",
        "layer_norm_eps": 1e-6,
    ]
    var llm: [String: Any] = [
        "model_type": "qwen2", "hidden_size": 128, "intermediate_size": 256,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 3,
        "rms_norm_eps": 1e-6, "vocab_size": 384, "rope_theta": 1_000_000.0,
        "tie_word_embeddings": false,
    ]
    if variant {
        vision["qkv_bias"] = false
        vision["qk_normalization"] = true
        vision["norm_type"] = "rms_norm"
        llm["tie_word_embeddings"] = true
        llm["attention_bias"] = false
    }
    return [
        "model_type": "internvl_chat", "downsample_ratio": 0.5, "image_token_index": 5,
        "vision_config": vision, "llm_config": llm,
    ]
}

private func makeModel(_ config: [String: Any]) throws -> InternVLChat {
    let data = try JSONSerialization.data(withJSONObject: config)
    return InternVLChat(try JSONDecoder().decode(InternVLChatConfiguration.self, from: data))
}

final class ParameterPathTests: XCTestCase {

    func testDeclaredParametersAreTheListedPaths() throws {
        for variant in [false, true] {
            let config = tinyConfig(variant: variant)
            let model = try makeModel(config)
            let declared = Set(model.parameters().flattened().map { $0.0 })
            XCTAssertEqual(declared, try ParameterPaths.parameters(config), "variant \(variant)")
        }
    }

    func testQuantizableModulesAreTheListedOnes() throws {
        for variant in [false, true] {
            let config = tinyConfig(variant: variant)
            let model = try makeModel(config)
            let quantizable = model.leafModules().flattened()
                .filter { $0.1 is Linear || $0.1 is Embedding }
                .map { $0.0 }
            XCTAssertEqual(Set(quantizable), try ParameterPaths.quantizable(config))
        }
    }

    /// What loadWeights does for a mixed-precision artifact: mlp1.1 quantized but not mlp1.0
    /// (the LayerNorm), and layer lists in which one layer stays float.
    func testMixedPrecisionQuantizeKeepsPathsAndLayers() throws {
        let model = try makeModel(tinyConfig())
        quantize(model: model) {
            (path: String, _: Module) -> (groupSize: Int, bits: Int, mode: QuantizationMode)? in
            if path == "mlp1.1" { return (32, 4, .affine) }
            if path.hasPrefix("language_model.model.layers.1.") { return (64, 2, .affine) }
            if path.hasPrefix("vision_model.encoder.layers.1.") { return (32, 4, .affine) }
            return nil
        }
        XCTAssertEqual(model.mlp1.count, 4)
        XCTAssertTrue(model.mlp1[0] is LayerNorm)
        XCTAssertTrue(model.mlp1[1] is QuantizedLinear)
        XCTAssertTrue(model.mlp1[2] is GELU)
        XCTAssertFalse(model.mlp1[3] is QuantizedLinear)
        let layers = model.languageModel.model.layers
        XCTAssertEqual(layers.count, 3)
        XCTAssertFalse(layers[0].attention.wq is QuantizedLinear)
        XCTAssertTrue(layers[1].attention.wq is QuantizedLinear)
        XCTAssertFalse(layers[2].mlp.down is QuantizedLinear)
        XCTAssertTrue(model.visionModel.encoder.layers[1].attention.qkv is QuantizedLinear)
        XCTAssertFalse(model.visionModel.encoder.layers[0].attention.qkv is QuantizedLinear)

        let keys = Set(model.parameters().flattened().map { $0.0 })
        XCTAssertTrue(keys.contains("mlp1.1.scales"))
        XCTAssertTrue(keys.contains("language_model.model.layers.1.mlp.down_proj.biases"))
        XCTAssertFalse(keys.contains("language_model.model.layers.0.mlp.down_proj.scales"))
    }
}

final class ModelTests: XCTestCase {

    func testPixelShuffleMatchesMLXVLM() throws {
        let reference = try XCTUnwrap(
            try readJSON("Tests/SpeedQVLMTests/reference_cases.json")["pixel_shuffle"]
                as? [String: Any])
        let x = MLXArray(0 ..< 32).reshaped(1, 16, 2).asType(.float32)
        let y = pixelShuffle(x, ratio: 0.5)
        XCTAssertEqual(y.shape, reference["output_shape"] as? [Int])
        XCTAssertEqual(
            y.asType(.int32).asArray(Int32.self).map(Int.init), reference["output"] as? [Int])
    }

    func testImageFeaturesFillTheImageTokens() throws {
        let model = try makeModel(tinyConfig())
        // 2 tiles of 56x56, 4 tokens per tile after pixel shuffle
        let pixels = MLXRandom.normal([2, 3, 56, 56])
        let ids = [1, 2] + Array(repeating: 5, count: 8) + [3, 4]
        let input = LMInput(
            text: .init(tokens: MLXArray(ids).expandedDimensions(axis: 0)),
            image: .init(pixels: pixels))

        let result = try model.prepare(
            input, cache: try model.newCache(parameters: nil), state: nil,
            prefill: PrefillParameters())
        guard case .logits(let output) = result else {
            return XCTFail("expected logits")
        }
        XCTAssertEqual(output.logits.dim(-1), 384)

        let tooFew = LMInput(
            text: .init(tokens: MLXArray([1, 5, 5, 2]).expandedDimensions(axis: 0)),
            image: .init(pixels: pixels))
        XCTAssertThrowsError(
            try model.prepare(
                tooFew, cache: try model.newCache(parameters: nil), state: nil,
                prefill: PrefillParameters()))
    }
}

final class ProcessorTests: XCTestCase {

    func testTileGridsMatchMLXVLM() throws {
        let tiling = try XCTUnwrap(
            try readJSON("Tests/SpeedQVLMTests/reference_cases.json")["tiling"] as? [String: Any])
        for case let c as [String: Int] in try XCTUnwrap(tiling["cases"] as? [Any]) {
            let grid = InternVLTiling.grid(
                width: c["width"]!, height: c["height"]!, minTiles: c["min_tiles"]!,
                maxTiles: c["max_tiles"]!, tileSize: c["tile_size"]!)
            XCTAssertEqual(grid.columns, c["columns"], "\(c)")
            XCTAssertEqual(grid.rows, c["rows"], "\(c)")
        }
    }

    func testTilesAndThumbnail() throws {
        let json = """
            {"processor_class": "InternVLChatProcessor", "size": 56, "dynamic_min_num": 1,
             "dynamic_max_num": 6, "use_thumbnail": true, "num_image_token": 4}
            """
        let config = try JSONDecoder().decode(
            InternVLChatProcessorConfiguration.self, from: Data(json.utf8))
        let image = CIImage(color: .red).cropped(to: CGRect(x: 0, y: 0, width: 120, height: 80))
        let tiles = InternVLTiling.tiles(of: image, config: config)
        XCTAssertEqual(tiles.count, 3 * 2 + 1)
        for tile in tiles {
            XCTAssertEqual(tile.extent, CGRect(x: 0, y: 0, width: 56, height: 56))
        }
    }

    /// preprocessor_config.json exactly as speedq_mlx/export.py writes it.
    func testSpeedQPreprocessorConfig() throws {
        let json = """
            {"processor_class": "InternVLChatProcessor",
             "image_processor_type": "InternVLImageProcessor", "size": 448, "do_resize": true,
             "do_normalize": true, "image_mean": [0.485, 0.456, 0.406],
             "image_std": [0.229, 0.224, 0.225], "dynamic_min_num": 1, "dynamic_max_num": 12,
             "use_thumbnail": true, "num_image_token": 256}
            """
        let config = try JSONDecoder().decode(
            InternVLChatProcessorConfiguration.self, from: Data(json.utf8))
        XCTAssertEqual(config.imageSize, 448)
        XCTAssertEqual(config.maxTiles, 12)
        XCTAssertEqual(config.numImageToken, 256)
        XCTAssertTrue(config.useThumbnail)
    }
}

/// End to end on a real artifact: SPEEDQ_ARTIFACT=/path/to/out/tiny-w2 swift test
final class ArtifactTests: XCTestCase {

    func testArtifactLoadsAndAnswers() async throws {
        guard let path = ProcessInfo.processInfo.environment["SPEEDQ_ARTIFACT"] else {
            throw XCTSkip("set SPEEDQ_ARTIFACT to a speedq-mlx artifact folder")
        }
        await SpeedQVLM.register()
        let context = try await VLMModelFactory.shared.load(
            from: URL(fileURLWithPath: path, isDirectory: true),
            using: #huggingFaceTokenizerLoader())
        XCTAssertTrue(context.model is InternVLChat)

        let image = CIImage(color: .blue).cropped(to: CGRect(x: 0, y: 0, width: 120, height: 80))
        let input = try await context.processor.prepare(
            input: UserInput(chat: [.user("What colour is it?", images: [.ciImage(image)])]))
        let pixels = try XCTUnwrap(input.image?.pixels)
        let model = try XCTUnwrap(context.model as? InternVLChat)
        let imageTokens = (input.text.tokens .== MLXArray(model.config.imageTokenIndex))
            .asType(.int32).sum().item(Int.self)
        XCTAssertGreaterThan(imageTokens, 0)
        XCTAssertEqual(imageTokens % pixels.dim(0), 0)

        let stream = try generate(
            input: input, parameters: GenerateParameters(maxTokens: 8, temperature: 0),
            context: context)
        var tokens = 0
        for await event in stream {
            if case .info(let info) = event { tokens = info.generationTokenCount }
        }
        XCTAssertGreaterThan(tokens, 0)
    }
}
