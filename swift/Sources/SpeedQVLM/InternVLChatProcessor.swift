// The InternVL processor: image tiles and the prompt, as mlx-vlm's InternVLChatProcessor
// (mlx_vlm/models/internvl_chat/processor.py) makes them, with the prompt rendered by the
// model's own chat template (chat_template.jinja / tokenizer_config.json; InternVL2 is ChatML,
// "Hermes-2") instead of mlx-vlm's generic "User: ... Assistant:" one.

import CoreImage
import Foundation
import MLX
import MLXLMCommon
import MLXVLM

/// preprocessor_config.json (MLXVLM reads it before processor_config.json) as speedq-mlx
/// writes it: `size`, `image_mean`, `image_std`, `dynamic_min_num`, `dynamic_max_num`,
/// `use_thumbnail`, `num_image_token`. processor_config.json's keys (`image_size`,
/// `patch_size`, `downsample_ratio`) are understood too.
public struct InternVLChatProcessorConfiguration: Decodable, Sendable {
    /// tile edge in pixels (448 for InternVL2/2.5/3)
    public var imageSize: Int
    public var imageMean: [CGFloat]
    public var imageStd: [CGFloat]
    public var minTiles: Int
    public var maxTiles: Int
    public var useThumbnail: Bool
    public var dynamicTiling: Bool
    /// `<IMG_CONTEXT>` tokens per tile: (image_size / patch_size)^2 * downsample_ratio^2
    public var numImageToken: Int

    enum CodingKeys: String, CodingKey {
        case size
        case imageSize = "image_size"
        case imageMean = "image_mean"
        case imageStd = "image_std"
        case minTiles = "dynamic_min_num"
        case maxTiles = "dynamic_max_num"
        case useThumbnail = "use_thumbnail"
        case dynamicUseThumbnail = "dynamic_use_thumbnail"
        case dynamicTiling = "do_dynamic_preprocess"
        case numImageToken = "num_image_token"
        case patchSize = "patch_size"
        case downsampleRatio = "downsample_ratio"
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        imageSize =
            try (try? c.decodeIfPresent(Int.self, forKey: .size))
            ?? c.decodeIfPresent(Int.self, forKey: .imageSize) ?? 448
        // ImageNet statistics
        imageMean =
            try c.decodeIfPresent([CGFloat].self, forKey: .imageMean) ?? [0.485, 0.456, 0.406]
        imageStd =
            try c.decodeIfPresent([CGFloat].self, forKey: .imageStd) ?? [0.229, 0.224, 0.225]
        minTiles = try c.decodeIfPresent(Int.self, forKey: .minTiles) ?? 1
        maxTiles = try c.decodeIfPresent(Int.self, forKey: .maxTiles) ?? 12
        useThumbnail =
            try c.decodeIfPresent(Bool.self, forKey: .useThumbnail)
            ?? c.decodeIfPresent(Bool.self, forKey: .dynamicUseThumbnail) ?? true
        dynamicTiling = try c.decodeIfPresent(Bool.self, forKey: .dynamicTiling) ?? true
        if let n = try c.decodeIfPresent(Int.self, forKey: .numImageToken) {
            numImageToken = n
        } else {
            let patch = try c.decodeIfPresent(Int.self, forKey: .patchSize) ?? 14
            let ratio = try c.decodeIfPresent(Double.self, forKey: .downsampleRatio) ?? 0.5
            let side = Double(imageSize / patch)
            numImageToken = Int(side * side * ratio * ratio)
        }
    }

    var meanTuple: (CGFloat, CGFloat, CGFloat) { (imageMean[0], imageMean[1], imageMean[2]) }
    var stdTuple: (CGFloat, CGFloat, CGFloat) { (imageStd[0], imageStd[1], imageStd[2]) }
}

// MARK: - Tiling (mlx-vlm's dynamic_preprocess / find_closest_aspect_ratio)

public enum InternVLTiling {

    /// The tile grid (columns, rows) mlx-vlm's `dynamic_preprocess` picks for an image.
    ///
    /// Candidates are every (i, j) with minTiles <= i * j <= maxTiles, in increasing i * j
    /// (ties in i * j by (i, j); Python's order there is its set's, and no two such candidates
    /// can both be the closest -- tests/test_swift_contract.py checks this against mlx-vlm). The
    /// closest aspect ratio wins; on an exact tie the one whose area is closer to the image's.
    public static func grid(
        width: Int, height: Int, minTiles: Int, maxTiles: Int, tileSize: Int
    ) -> (columns: Int, rows: Int) {
        // Python builds them over n in minTiles...maxTiles and i, j in 1...n: the same set
        var candidates = [(Int, Int)]()
        for i in stride(from: 1, through: maxTiles, by: 1) {
            for j in stride(from: 1, through: maxTiles, by: 1) {
                if minTiles <= i * j && i * j <= maxTiles {
                    candidates.append((i, j))
                }
            }
        }
        candidates.sort { a, b in
            (a.0 * a.1, a.0, a.1) < (b.0 * b.1, b.0, b.1)
        }

        let aspectRatio = Double(width) / Double(height)
        let area = Double(width * height)
        let tileArea = Double(tileSize * tileSize)
        var bestDiff = Double.infinity
        var best = (1, 1)
        for ratio in candidates {
            let diff = abs(aspectRatio - Double(ratio.0) / Double(ratio.1))
            if diff < bestDiff {
                bestDiff = diff
                best = ratio
            } else if diff == bestDiff {
                let target = tileArea * Double(ratio.0 * ratio.1)
                if abs(area - target) < abs(area - tileArea * Double(best.0 * best.1)) {
                    best = ratio
                }
            }
        }
        return best
    }

    /// The tiles of one image, left to right and top to bottom, then the thumbnail (the whole
    /// image at tileSize x tileSize) when there is more than one tile and `useThumbnail`.
    public static func tiles(
        of image: CIImage, config: InternVLChatProcessorConfiguration
    ) -> [CIImage] {
        let origin = image.extent.origin
        let image = image.transformed(by: CGAffineTransform(translationX: -origin.x, y: -origin.y))
        let size = config.imageSize
        let tileSize = CGSize(width: size, height: size)
        guard config.dynamicTiling else {
            return [image.resampled(to: tileSize, method: .bicubic)]
        }

        let (columns, rows) = grid(
            width: Int(image.extent.width.rounded()), height: Int(image.extent.height.rounded()),
            minTiles: config.minTiles, maxTiles: config.maxTiles, tileSize: size)
        let resized = image.resampled(
            to: CGSize(width: size * columns, height: size * rows), method: .bicubic)

        var tiles = [CIImage]()
        for row in 0 ..< rows {
            for column in 0 ..< columns {
                // CIImage's y axis points up: image row 0 is the top, at the largest y
                let rect = CGRect(
                    x: column * size, y: (rows - 1 - row) * size, width: size, height: size)
                let toOrigin = CGAffineTransform(translationX: -rect.minX, y: -rect.minY)
                tiles.append(resized.cropped(to: rect).transformed(by: toOrigin))
            }
        }
        if config.useThumbnail && tiles.count > 1 {
            tiles.append(image.resampled(to: tileSize, method: .bicubic))
        }
        return tiles
    }
}

// MARK: - Messages

/// Renders each message's images as InternVL's `<image>` placeholder, one per image, before
/// the text ("<image>\nWhat is this?"), with the content a plain string as the InternVL chat
/// templates expect.
public struct InternVLMessageGenerator: MessageGenerator {
    public init() {}

    public func generate(message: Chat.Message) -> MLXLMCommon.Message {
        let placeholders = String(
            repeating: InternVLChatProcessor.imagePlaceholder + "\n", count: message.images.count)
        var dictionary: MLXLMCommon.Message = [
            "role": message.role.rawValue,
            "content": placeholders + message.content,
        ]
        addToolMetadata(to: &dictionary, for: message)
        return dictionary
    }
}

// MARK: - Processor

/// `processor_class: InternVLChatProcessor`.
public struct InternVLChatProcessor: UserInputProcessor {
    static let imagePlaceholder = "<image>"
    static let imageStart = "<img>"
    static let imageEnd = "</img>"
    static let imageContext = "<IMG_CONTEXT>"

    private let config: InternVLChatProcessorConfiguration
    private let tokenizer: any Tokenizer

    public init(_ config: InternVLChatProcessorConfiguration, tokenizer: any Tokenizer) {
        self.config = config
        self.tokenizer = tokenizer
    }

    public func prepare(input: UserInput) async throws -> LMInput {
        let messages = InternVLMessageGenerator().generate(from: input)
        let promptTokens = try tokenizer.applyChatTemplate(
            messages: messages, tools: input.tools, additionalContext: input.additionalContext)

        if input.images.isEmpty {
            let tokens = MLXArray(promptTokens).expandedDimensions(axis: 0)
            return LMInput(text: .init(tokens: tokens, mask: ones(like: tokens)))
        }

        // Tiles of every image, in order. mlx-vlm tiles the image as it is, so
        // `input.processing.resize` is not applied (it would change the tile grid).
        var pixels = [MLXArray]()
        var tileCounts = [Int]()
        for image in input.images {
            let ciImage = try image.asCIImage().toSRGB()
            let tiles = InternVLTiling.tiles(of: ciImage, config: config)
            tileCounts.append(tiles.count)
            for tile in tiles {
                pixels.append(
                    tile.normalized(mean: config.meanTuple, std: config.stdTuple).asMLXArray())
            }
        }

        // Tokenizers have no "render only", so the templated prompt is decoded, split at the
        // placeholders, and each image's placeholder becomes <img><IMG_CONTEXT>*N</img>.
        let rendered = tokenizer.decode(tokenIds: promptTokens, skipSpecialTokens: false)
        let pieces = rendered.components(separatedBy: Self.imagePlaceholder)
        guard pieces.count - 1 == tileCounts.count else {
            throw VLMError.processing(
                "the prompt has \(pieces.count - 1) \(Self.imagePlaceholder) placeholders "
                    + "for \(tileCounts.count) images")
        }
        guard let start = tokenizer.convertTokenToId(Self.imageStart),
            let context = tokenizer.convertTokenToId(Self.imageContext),
            let end = tokenizer.convertTokenToId(Self.imageEnd)
        else {
            throw VLMError.processing("the tokenizer has no <img> / <IMG_CONTEXT> / </img> tokens")
        }

        var tokens = [Int]()
        for (index, piece) in pieces.enumerated() {
            tokens += tokenizer.encode(text: piece, addSpecialTokens: false)
            if index < tileCounts.count {
                tokens.append(start)
                tokens += Array(repeating: context, count: config.numImageToken * tileCounts[index])
                tokens.append(end)
            }
        }

        let tokenArray = MLXArray(tokens).expandedDimensions(axis: 0)
        return LMInput(
            text: .init(tokens: tokenArray, mask: ones(like: tokenArray)),
            image: .init(pixels: concatenated(pixels, axis: 0)))  // [tiles, 3, size, size]
    }
}
