// InternVL (`model_type: internvl_chat`) for MLXVLM.
//
// A port of mlx-vlm's Python implementation (mlx_vlm/models/internvl_chat: internvl_chat.py,
// vision.py, language.py, and pixel_shuffle in models/base.py), module by module, so that every
// parameter path is the one mlx-vlm uses and the one a speedq-mlx artifact stores:
//
//   vision_model   InternViT (embeddings + encoder.layers.{v})       -> Vision.VisionModel
//   mlp1           [LayerNorm, Linear, GELU, Linear]                 -> InternVLChat.mlp1
//   language_model Qwen2 decoder (model.embed_tokens, model.layers.{t}, model.norm, lm_head)
//                                                                    -> Language.LanguageModel
//
// The full list of paths, and the rule that expands it for N layers, is parameter_paths.json
// beside this file; tests/test_swift_contract.py (Python) and Tests/SpeedQVLMTests (Swift)
// both check against it. Each `@ModuleInfo(key:)` / `@ParameterInfo(key:)` below is one path
// component of that list.
//
// MLXLLM's Qwen2 is not reused: its inner model takes token ids only (no input embeddings to
// splice image features into) and its members are internal, so the decoder is written here in
// the same shape as MLXVLM's FastVLM / Qwen2VL language models.

import Foundation
import MLX
import MLXLMCommon
import MLXNN
import MLXVLM

// MARK: - Configuration

/// config.json of an InternVL checkpoint (the keys mlx-vlm's `ModelConfig` reads).
public struct InternVLChatConfiguration: Decodable, Sendable {

    public struct VisionConfiguration: Decodable, Sendable {
        public var modelType: String
        public var hiddenSize: Int
        public var numAttentionHeads: Int
        public var patchSize: Int
        public var numHiddenLayers: Int
        public var intermediateSize: Int
        public var imageSize: Int
        public var numChannels: Int
        public var layerNormEps: Float
        public var qkvBias: Bool
        public var qkNormalization: Bool
        public var normType: String

        enum CodingKeys: String, CodingKey {
            case modelType = "model_type"
            case hiddenSize = "hidden_size"
            case numAttentionHeads = "num_attention_heads"
            case patchSize = "patch_size"
            case numHiddenLayers = "num_hidden_layers"
            case intermediateSize = "intermediate_size"
            case imageSize = "image_size"
            case numChannels = "num_channels"
            case layerNormEps = "layer_norm_eps"
            case qkvBias = "qkv_bias"
            case qkNormalization = "qk_normalization"
            case normType = "norm_type"
        }

        public init(from decoder: any Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            // defaults are mlx-vlm's VisionConfig defaults
            modelType = try c.decodeIfPresent(String.self, forKey: .modelType) ?? "intern_vit_6b"
            hiddenSize = try c.decodeIfPresent(Int.self, forKey: .hiddenSize) ?? 1024
            numAttentionHeads = try c.decodeIfPresent(Int.self, forKey: .numAttentionHeads) ?? 16
            patchSize = try decodeIntOrFirst(c, .patchSize) ?? 14
            numHiddenLayers = try c.decodeIfPresent(Int.self, forKey: .numHiddenLayers) ?? 24
            intermediateSize = try c.decodeIfPresent(Int.self, forKey: .intermediateSize) ?? 4096
            imageSize = try decodeIntOrFirst(c, .imageSize) ?? 448
            numChannels = try c.decodeIfPresent(Int.self, forKey: .numChannels) ?? 3
            layerNormEps = try c.decodeIfPresent(Float.self, forKey: .layerNormEps) ?? 1e-6
            qkvBias = try c.decodeIfPresent(Bool.self, forKey: .qkvBias) ?? true
            qkNormalization = try c.decodeIfPresent(Bool.self, forKey: .qkNormalization) ?? false
            normType = try c.decodeIfPresent(String.self, forKey: .normType) ?? "layer_norm"
        }
    }

    public struct TextConfiguration: Decodable, Sendable {
        public var modelType: String
        public var hiddenSize: Int
        public var numHiddenLayers: Int
        public var intermediateSize: Int
        public var numAttentionHeads: Int
        public var rmsNormEps: Float
        public var vocabSize: Int
        public var numKeyValueHeads: Int
        public var headDim: Int
        public var ropeTheta: Float
        public var ropeTraditional: Bool
        public var tieWordEmbeddings: Bool
        public var attentionBias: Bool

        enum CodingKeys: String, CodingKey {
            case modelType = "model_type"
            case hiddenSize = "hidden_size"
            case numHiddenLayers = "num_hidden_layers"
            case intermediateSize = "intermediate_size"
            case numAttentionHeads = "num_attention_heads"
            case rmsNormEps = "rms_norm_eps"
            case vocabSize = "vocab_size"
            case numKeyValueHeads = "num_key_value_heads"
            case headDim = "head_dim"
            case ropeTheta = "rope_theta"
            case ropeTraditional = "rope_traditional"
            case tieWordEmbeddings = "tie_word_embeddings"
            case attentionBias = "attention_bias"
        }

        public init(from decoder: any Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            modelType = try c.decodeIfPresent(String.self, forKey: .modelType) ?? "qwen2"
            hiddenSize = try c.decode(Int.self, forKey: .hiddenSize)
            numHiddenLayers = try c.decode(Int.self, forKey: .numHiddenLayers)
            intermediateSize = try c.decode(Int.self, forKey: .intermediateSize)
            numAttentionHeads = try c.decode(Int.self, forKey: .numAttentionHeads)
            rmsNormEps = try c.decode(Float.self, forKey: .rmsNormEps)
            vocabSize = try c.decode(Int.self, forKey: .vocabSize)
            // mlx-vlm: absent -> 8, null -> num_attention_heads (speedq-mlx always writes it)
            if !c.contains(.numKeyValueHeads) {
                numKeyValueHeads = 8
            } else {
                numKeyValueHeads =
                    try c.decodeIfPresent(Int.self, forKey: .numKeyValueHeads) ?? numAttentionHeads
            }
            headDim =
                try c.decodeIfPresent(Int.self, forKey: .headDim) ?? hiddenSize / numAttentionHeads
            ropeTheta = try c.decodeIfPresent(Float.self, forKey: .ropeTheta) ?? 1_000_000
            ropeTraditional = try c.decodeIfPresent(Bool.self, forKey: .ropeTraditional) ?? false
            tieWordEmbeddings =
                try c.decodeIfPresent(Bool.self, forKey: .tieWordEmbeddings) ?? false
            attentionBias = try c.decodeIfPresent(Bool.self, forKey: .attentionBias) ?? true
        }
    }

    public var modelType: String
    public var visionConfiguration: VisionConfiguration
    public var textConfiguration: TextConfiguration
    /// id of `<IMG_CONTEXT>` (speedq-mlx writes the tokenizer's id; mlx-vlm's default is
    /// InternVL2.5's 151667)
    public var imageTokenIndex: Int
    public var downsampleRatio: Float

    enum CodingKeys: String, CodingKey {
        case modelType = "model_type"
        case visionConfiguration = "vision_config"
        case llmConfiguration = "llm_config"
        case textConfiguration = "text_config"
        case imageTokenIndex = "image_token_index"
        case downsampleRatio = "downsample_ratio"
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        modelType = try c.decode(String.self, forKey: .modelType)
        visionConfiguration = try c.decode(VisionConfiguration.self, forKey: .visionConfiguration)
        // InternVL's own configs say `llm_config`; mlx-vlm renames it `text_config`
        textConfiguration =
            try c.decodeIfPresent(TextConfiguration.self, forKey: .llmConfiguration)
            ?? c.decode(TextConfiguration.self, forKey: .textConfiguration)
        imageTokenIndex = try c.decodeIfPresent(Int.self, forKey: .imageTokenIndex) ?? 151667
        downsampleRatio = try c.decodeIfPresent(Float.self, forKey: .downsampleRatio) ?? 0.5
    }
}

/// mlx-vlm's `normalize_dim`: `image_size` / `patch_size` may be an int or a list.
private func decodeIntOrFirst<K: CodingKey>(
    _ c: KeyedDecodingContainer<K>, _ key: K
) throws -> Int? {
    if let value = try? c.decodeIfPresent(Int.self, forKey: key) {
        return value
    }
    return try c.decodeIfPresent([Int].self, forKey: key)?.first
}

// MARK: - Vision (mlx_vlm/models/internvl_chat/vision.py)

enum Vision {

    /// parameter_paths.json: vision_model.encoder.layers.{v}.attn.*
    final class Attention: Module {
        let numHeads: Int
        let scale: Float
        let qkNormalization: Bool

        @ModuleInfo(key: "qkv") var qkv: Linear
        @ModuleInfo(key: "proj") var proj: Linear
        @ModuleInfo(key: "q_norm") var qNorm: RMSNorm?
        @ModuleInfo(key: "k_norm") var kNorm: RMSNorm?

        init(_ config: InternVLChatConfiguration.VisionConfiguration) {
            let dims = config.hiddenSize
            precondition(dims % config.numAttentionHeads == 0)
            self.numHeads = config.numAttentionHeads
            self.scale = pow(Float(dims / config.numAttentionHeads), -0.5)
            self.qkNormalization = config.qkNormalization
            self._qkv.wrappedValue = Linear(dims, 3 * dims, bias: config.qkvBias)
            self._proj.wrappedValue = Linear(dims, dims, bias: true)
            if config.qkNormalization {
                self._qNorm.wrappedValue = RMSNorm(dimensions: dims, eps: config.layerNormEps)
                self._kNorm.wrappedValue = RMSNorm(dimensions: dims, eps: config.layerNormEps)
            }
        }

        func callAsFunction(_ x: MLXArray) -> MLXArray {
            let (B, L, C) = (x.dim(0), x.dim(1), x.dim(2))
            let qkv = self.qkv(x).reshaped(B, L, 3, numHeads, C / numHeads)
                .transposed(2, 0, 3, 1, 4)
            var q = qkv[0]  // [B, heads, L, headDim]
            var k = qkv[1]
            let v = qkv[2]

            if qkNormalization, let qNorm, let kNorm {
                // normalised over all heads together, as in mlx-vlm
                let headDim = C / numHeads
                q = qNorm(q.transposed(0, 2, 1, 3).reshaped(B, L, C))
                    .reshaped(B, L, numHeads, headDim).transposed(0, 2, 1, 3)
                k = kNorm(k.transposed(0, 2, 1, 3).reshaped(B, L, C))
                    .reshaped(B, L, numHeads, headDim).transposed(0, 2, 1, 3)
            }

            let output = MLXFast.scaledDotProductAttention(
                queries: q, keys: k, values: v, scale: scale, mask: .none
            )
            .transposed(0, 2, 1, 3)
            .reshaped(B, L, -1)
            return proj(output)
        }
    }

    /// parameter_paths.json: vision_model.encoder.layers.{v}.mlp.*
    final class MLP: Module, UnaryLayer {
        @ModuleInfo(key: "fc1") var fc1: Linear
        @ModuleInfo(key: "fc2") var fc2: Linear
        let activation = GELU(approximation: .precise)  // nn.GELU(approx="precise")

        init(_ config: InternVLChatConfiguration.VisionConfiguration) {
            self._fc1.wrappedValue = Linear(config.hiddenSize, config.intermediateSize)
            self._fc2.wrappedValue = Linear(config.intermediateSize, config.hiddenSize)
        }

        func callAsFunction(_ x: MLXArray) -> MLXArray {
            fc2(activation(fc1(x)))
        }
    }

    /// parameter_paths.json: vision_model.encoder.layers.{v}.{attn, mlp, norm1, norm2, ls1, ls2}
    final class EncoderLayer: Module {
        @ModuleInfo(key: "attn") var attention: Attention
        @ModuleInfo(key: "mlp") var mlp: MLP
        @ModuleInfo(key: "norm1") var norm1: UnaryLayer
        @ModuleInfo(key: "norm2") var norm2: UnaryLayer
        @ParameterInfo(key: "ls1") var ls1: MLXArray
        @ParameterInfo(key: "ls2") var ls2: MLXArray

        init(_ config: InternVLChatConfiguration.VisionConfiguration) {
            let dims = config.hiddenSize
            self._attention.wrappedValue = Attention(config)
            self._mlp.wrappedValue = MLP(config)
            if config.normType == "rms_norm" {
                self._norm1.wrappedValue = RMSNorm(dimensions: dims, eps: config.layerNormEps)
                self._norm2.wrappedValue = RMSNorm(dimensions: dims, eps: config.layerNormEps)
            } else {
                precondition(
                    config.normType == "layer_norm", "unsupported norm_type \(config.normType)")
                self._norm1.wrappedValue = LayerNorm(dimensions: dims, eps: config.layerNormEps)
                self._norm2.wrappedValue = LayerNorm(dimensions: dims, eps: config.layerNormEps)
            }
            self._ls1.wrappedValue = MLXArray.ones([dims])
            self._ls2.wrappedValue = MLXArray.ones([dims])
        }

        func callAsFunction(_ x: MLXArray) -> MLXArray {
            let dtype = x.dtype
            var x = x + attention(norm1(x).asType(dtype)) * ls1
            x = x + mlp(norm2(x).asType(dtype)) * ls2
            return x.asType(dtype)
        }
    }

    /// parameter_paths.json: vision_model.encoder.layers
    final class Encoder: Module {
        @ModuleInfo(key: "layers") var layers: [EncoderLayer]

        init(_ config: InternVLChatConfiguration.VisionConfiguration) {
            self._layers.wrappedValue = (0 ..< config.numHiddenLayers).map { _ in
                EncoderLayer(config)
            }
        }

        func callAsFunction(_ x: MLXArray) -> MLXArray {
            var h = x
            for layer in layers {
                h = layer(h)
            }
            return h
        }
    }

    /// parameter_paths.json: vision_model.embeddings.*
    final class VisionEmbeddings: Module {
        let embedDim: Int
        let gridSize: Int

        @ParameterInfo(key: "class_embedding") var classEmbedding: MLXArray
        @ModuleInfo(key: "patch_embedding") var patchEmbedding: Conv2d
        @ParameterInfo(key: "position_embedding") var positionEmbedding: MLXArray

        init(_ config: InternVLChatConfiguration.VisionConfiguration) {
            self.embedDim = config.hiddenSize
            self.gridSize = config.imageSize / config.patchSize
            self._classEmbedding.wrappedValue = MLXArray.zeros([1, 1, embedDim])
            self._patchEmbedding.wrappedValue = Conv2d(
                inputChannels: config.numChannels, outputChannels: embedDim,
                kernelSize: .init(config.patchSize), stride: .init(config.patchSize))
            self._positionEmbedding.wrappedValue = MLXArray.zeros(
                [1, gridSize * gridSize + 1, embedDim])
        }

        /// `x`: [B, H, W, C] pixels (NHWC, as MLX's Conv2d wants).
        func callAsFunction(_ x: MLXArray) -> MLXArray {
            let dtype = patchEmbedding.weight.dtype
            let patches = patchEmbedding(x)  // [B, h, w, D]
            let (B, h, w) = (patches.dim(0), patches.dim(1), patches.dim(2))
            let patchEmbeds = patches.reshaped(B, h * w, embedDim)
            let classEmbeds = broadcast(classEmbedding, to: [B, 1, embedDim]).asType(dtype)
            let embeddings = concatenated([classEmbeds, patchEmbeds], axis: 1)

            var grid = positionEmbedding[0..., 1..., 0...]
            if h != gridSize || w != gridSize {
                // mlx-vlm always resamples (bicubic, align_corners=False); at the native grid,
                // which is what every 448x448 tile gives, that is the identity, so it is skipped.
                let nchw = grid.reshaped(1, gridSize, gridSize, embedDim).transposed(0, 3, 1, 2)
                grid = bicubicInterpolate(nchw.asType(.float32), size: (h, w), alignCorners: false)
                    .reshaped(1, embedDim, h * w).transposed(0, 2, 1)
                    .asType(positionEmbedding.dtype)
            }
            let position = concatenated([positionEmbedding[0..., ..<1, 0...], grid], axis: 1)
            return embeddings + position.asType(dtype)
        }
    }

    /// parameter_paths.json: vision_model.*
    final class VisionModel: Module {
        @ModuleInfo(key: "embeddings") var embeddings: VisionEmbeddings
        @ModuleInfo(key: "encoder") var encoder: Encoder

        init(_ config: InternVLChatConfiguration.VisionConfiguration) {
            precondition(
                ["intern_vit_6b", "siglip_vision_model"].contains(config.modelType),
                "unsupported vision model type \(config.modelType)")
            self._embeddings.wrappedValue = VisionEmbeddings(config)
            self._encoder.wrappedValue = Encoder(config)
        }

        /// The last hidden state, [B, 1 + patches, D] (class token first).
        func callAsFunction(_ x: MLXArray) -> MLXArray {
            encoder(embeddings(x))
        }
    }
}

// MARK: - Language (mlx_vlm/models/internvl_chat/language.py: a Qwen2 decoder)

enum Language {

    /// parameter_paths.json: language_model.model.layers.{t}.self_attn.*
    final class Attention: Module {
        let heads: Int
        let kvHeads: Int
        let headDim: Int
        let scale: Float

        @ModuleInfo(key: "q_proj") var wq: Linear
        @ModuleInfo(key: "k_proj") var wk: Linear
        @ModuleInfo(key: "v_proj") var wv: Linear
        @ModuleInfo(key: "o_proj") var wo: Linear
        // Qwen3-style QK norm, only when attention_bias is false (as in mlx-vlm)
        @ModuleInfo(key: "q_norm") var qNorm: RMSNorm?
        @ModuleInfo(key: "k_norm") var kNorm: RMSNorm?

        let rope: RoPE

        init(_ args: InternVLChatConfiguration.TextConfiguration) {
            let dim = args.hiddenSize
            self.heads = args.numAttentionHeads
            self.kvHeads = args.numKeyValueHeads
            self.headDim = args.headDim
            self.scale = pow(Float(headDim), -0.5)

            self._wq.wrappedValue = Linear(dim, heads * headDim, bias: args.attentionBias)
            self._wk.wrappedValue = Linear(dim, kvHeads * headDim, bias: args.attentionBias)
            self._wv.wrappedValue = Linear(dim, kvHeads * headDim, bias: args.attentionBias)
            self._wo.wrappedValue = Linear(heads * headDim, dim, bias: false)
            if !args.attentionBias {
                self._qNorm.wrappedValue = RMSNorm(dimensions: headDim, eps: args.rmsNormEps)
                self._kNorm.wrappedValue = RMSNorm(dimensions: headDim, eps: args.rmsNormEps)
            }
            // mlx-vlm's internvl_chat ignores rope_scaling
            self.rope = RoPE(
                dimensions: headDim, traditional: args.ropeTraditional, base: args.ropeTheta)
        }

        func callAsFunction(
            _ x: MLXArray, mask: MLXFast.ScaledDotProductAttentionMaskMode, cache: KVCache?
        ) -> MLXArray {
            let (B, L) = (x.dim(0), x.dim(1))

            var queries = wq(x).reshaped(B, L, heads, headDim)
            var keys = wk(x).reshaped(B, L, kvHeads, headDim)
            let values = wv(x).reshaped(B, L, kvHeads, headDim).transposed(0, 2, 1, 3)
            if let qNorm, let kNorm {
                queries = qNorm(queries)
                keys = kNorm(keys)
            }
            queries = queries.transposed(0, 2, 1, 3)
            keys = keys.transposed(0, 2, 1, 3)

            let offset = cache?.ropeOffset
            queries = applyRotaryPosition(rope, to: queries, offset: offset)
            keys = applyRotaryPosition(rope, to: keys, offset: offset)

            let output = attentionWithCacheUpdate(
                queries: queries, keys: keys, values: values, cache: cache, scale: scale,
                mask: mask
            )
            .transposed(0, 2, 1, 3)
            .reshaped(B, L, -1)
            return wo(output)
        }
    }

    /// parameter_paths.json: language_model.model.layers.{t}.mlp.* (mlx-vlm's SwiGLUMLP)
    final class MLP: Module, UnaryLayer {
        @ModuleInfo(key: "gate_proj") var gate: Linear
        @ModuleInfo(key: "up_proj") var up: Linear
        @ModuleInfo(key: "down_proj") var down: Linear

        init(dimensions: Int, hiddenDimensions: Int) {
            self._gate.wrappedValue = Linear(dimensions, hiddenDimensions, bias: false)
            self._up.wrappedValue = Linear(dimensions, hiddenDimensions, bias: false)
            self._down.wrappedValue = Linear(hiddenDimensions, dimensions, bias: false)
        }

        func callAsFunction(_ x: MLXArray) -> MLXArray {
            down(silu(gate(x)) * up(x))
        }
    }

    /// parameter_paths.json: language_model.model.layers.{t}.*
    final class DecoderLayer: Module {
        @ModuleInfo(key: "self_attn") var attention: Attention
        @ModuleInfo(key: "mlp") var mlp: MLP
        @ModuleInfo(key: "input_layernorm") var inputLayerNorm: RMSNorm
        @ModuleInfo(key: "post_attention_layernorm") var postAttentionLayerNorm: RMSNorm

        init(_ args: InternVLChatConfiguration.TextConfiguration) {
            self._attention.wrappedValue = Attention(args)
            self._mlp.wrappedValue = MLP(
                dimensions: args.hiddenSize, hiddenDimensions: args.intermediateSize)
            self._inputLayerNorm.wrappedValue = RMSNorm(
                dimensions: args.hiddenSize, eps: args.rmsNormEps)
            self._postAttentionLayerNorm.wrappedValue = RMSNorm(
                dimensions: args.hiddenSize, eps: args.rmsNormEps)
        }

        func callAsFunction(
            _ x: MLXArray, mask: MLXFast.ScaledDotProductAttentionMaskMode, cache: KVCache?
        ) -> MLXArray {
            let h = x + attention(inputLayerNorm(x), mask: mask, cache: cache)
            return h + mlp(postAttentionLayerNorm(h))
        }
    }

    /// parameter_paths.json: language_model.model.*
    final class Qwen2Model: Module {
        @ModuleInfo(key: "embed_tokens") var embedTokens: Embedding
        @ModuleInfo(key: "layers") var layers: [DecoderLayer]
        @ModuleInfo(key: "norm") var norm: RMSNorm

        init(_ args: InternVLChatConfiguration.TextConfiguration) {
            precondition(args.vocabSize > 0)
            self._embedTokens.wrappedValue = Embedding(
                embeddingCount: args.vocabSize, dimensions: args.hiddenSize)
            self._layers.wrappedValue = (0 ..< args.numHiddenLayers).map { _ in DecoderLayer(args) }
            self._norm.wrappedValue = RMSNorm(dimensions: args.hiddenSize, eps: args.rmsNormEps)
        }

        func callAsFunction(
            _ inputs: MLXArray?, cache: [KVCache]?, inputEmbedding: MLXArray?
        ) -> MLXArray {
            var h: MLXArray
            if let inputEmbedding {
                h = inputEmbedding
            } else if let inputs {
                h = embedTokens(inputs)
            } else {
                fatalError("one of inputs or inputEmbedding must be non-nil")
            }

            let mask = createAttentionMask(h: h, cache: cache?.first)
            for (i, layer) in layers.enumerated() {
                h = layer(h, mask: mask, cache: cache?[i])
            }
            return norm(h)
        }
    }

    /// parameter_paths.json: language_model.{model, lm_head}
    final class LanguageModel: Module {
        @ModuleInfo(key: "model") var model: Qwen2Model
        @ModuleInfo(key: "lm_head") var lmHead: Linear?

        let kvHeads: [Int]

        init(_ args: InternVLChatConfiguration.TextConfiguration) {
            self._model.wrappedValue = Qwen2Model(args)
            if !args.tieWordEmbeddings {
                self._lmHead.wrappedValue = Linear(args.hiddenSize, args.vocabSize, bias: false)
            }
            self.kvHeads = Array(repeating: args.numKeyValueHeads, count: args.numHiddenLayers)
        }

        func callAsFunction(
            _ inputs: MLXArray?, cache: [KVCache]? = nil, inputEmbedding: MLXArray? = nil
        ) -> LMOutput {
            let out = model(inputs, cache: cache, inputEmbedding: inputEmbedding)
            if let lmHead {
                return LMOutput(logits: lmHead(out))
            }
            return LMOutput(logits: model.embedTokens.asLinear(out))
        }
    }
}

// MARK: - pixel_shuffle (mlx_vlm/models/base.py)

/// [B, N, C] -> [B, N * r^2, C / r^2]: merges each 2x2 (for r = 0.5) patch neighbourhood into
/// one token, with exactly mlx-vlm's reshape / transpose sequence.
func pixelShuffle(_ x: MLXArray, ratio: Float) -> MLXArray {
    let (B, N, C) = (x.dim(0), x.dim(1), x.dim(2))
    let side = Int(Double(N).squareRoot())
    let (height, width) = (side, side)
    var t = x.reshaped(B, height, width, C)
    t = t.reshaped(B, height, Int(Float(width) * ratio), Int(Float(C) / ratio))
    t = t.transposed(0, 2, 1, 3)
    t = t.reshaped(
        B, Int(Float(height) * ratio), Int(Float(width) * ratio), Int(Float(C) / (ratio * ratio)))
    t = t.transposed(0, 2, 1, 3)
    return t.reshaped(B, -1, t.dim(-1))
}

// MARK: - Model (mlx_vlm/models/internvl_chat/internvl_chat.py)

/// InternVL chat model: InternViT -> pixel shuffle -> `mlp1` -> Qwen2.
public final class InternVLChat: Module, VLMModel, KVCacheDimensionProvider {
    @ModuleInfo(key: "vision_model") var visionModel: Vision.VisionModel
    @ModuleInfo(key: "language_model") var languageModel: Language.LanguageModel
    /// parameter_paths.json: mlp1.0 (LayerNorm), mlp1.1 (Linear), mlp1.2 (GELU, no
    /// parameters), mlp1.3 (Linear) -- a list, as in mlx-vlm, so the paths are `mlp1.N`.
    @ModuleInfo(key: "mlp1") var mlp1: [UnaryLayer]

    public let config: InternVLChatConfiguration

    public var kvHeads: [Int] { languageModel.kvHeads }

    public var loraLayers: [Module] { languageModel.model.layers }

    public init(_ config: InternVLChatConfiguration) {
        self.config = config
        let vision = config.visionConfiguration
        let text = config.textConfiguration
        let scale = Int(1 / config.downsampleRatio)  // 2: 2x2 patches per token
        let shuffled = vision.hiddenSize * scale * scale
        self._visionModel.wrappedValue = Vision.VisionModel(vision)
        self._languageModel.wrappedValue = Language.LanguageModel(text)
        self._mlp1.wrappedValue = [
            LayerNorm(dimensions: shuffled),  // nn.LayerNorm default eps 1e-5
            Linear(shuffled, text.hiddenSize),
            GELU(),  // nn.GELU(): exact erf
            Linear(text.hiddenSize, text.hiddenSize),
        ]
    }

    /// Token embeddings with the `<IMG_CONTEXT>` positions replaced by image features.
    ///
    /// `pixelValues`: [tiles, 3, H, W] (or [1, tiles, 3, H, W]), all images of the prompt in
    /// order; their features fill the image-token positions in order, as mlx-vlm does.
    func inputEmbeddings(inputIds: MLXArray, pixelValues: MLXArray?) throws -> MLXArray {
        let embeddings = languageModel.model.embedTokens(inputIds)
        guard var pixels = pixelValues else {
            return embeddings
        }
        if pixels.ndim == 5 {
            pixels = pixels[0]
        }
        pixels = pixels.asType(visionModel.embeddings.patchEmbedding.weight.dtype)

        var features = visionModel(pixels.transposed(0, 2, 3, 1))
        features = features[0..., 1..., 0...]  // drop the class token
        features = pixelShuffle(features, ratio: config.downsampleRatio)
        for layer in mlp1 {
            features = layer(features)
        }
        features = features.reshaped(-1, features.dim(-1))

        let isImage = inputIds .== MLXArray(config.imageTokenIndex)
        let count = isImage.asType(.int32).sum().item(Int.self)
        guard count == features.dim(0) else {
            throw VLMError.processing(
                "the prompt has \(count) image tokens (id \(config.imageTokenIndex)) but the "
                    + "images give \(features.dim(0)) features")
        }
        // the k-th image token takes the k-th feature row
        let order = maximum(cumsum(isImage.asType(.int32), axis: -1) - 1, 0)
        let spliced = take(features, order, axis: 0).asType(embeddings.dtype)
        return which(isImage.expandedDimensions(axis: -1), spliced, embeddings)
    }

    public func prepare(
        _ input: LMInput, cache: [any KVCache], state _: LMOutput.State?, prefill: PrefillParameters
    ) throws -> PrepareResult {
        var tokens = input.text.tokens
        if tokens.ndim == 1 {
            tokens = tokens.expandedDimensions(axis: 0)
        }
        let embeddings = try inputEmbeddings(inputIds: tokens, pixelValues: input.image?.pixels)

        // chunked prefill of the merged embeddings; the last position gives the first logits
        let total = embeddings.dim(1)
        let processed = try prefill.forEachChunk(total: total) { range in
            _ = languageModel(nil, cache: cache, inputEmbedding: embeddings[0..., range, 0...])
            eval(cache)
        }
        let result = languageModel(
            nil, cache: cache, inputEmbedding: embeddings[0..., processed..., 0...])
        prefill.progress?(total, total)
        return .logits(result)
    }

    public func callAsFunction(_ inputs: MLXArray, cache: [any KVCache]?) -> MLXArray {
        languageModel(inputs, cache: cache).logits
    }

    /// parameter_paths.json "sanitize": no renames; drop unused keys; PyTorch conv layout.
    public func sanitize(weights: [String: MLXArray]) -> [String: MLXArray] {
        let tied = config.textConfiguration.tieWordEmbeddings
        var out = [String: MLXArray]()
        for (key, value) in weights {
            if key.contains("position_ids") || key.contains("self_attn.rotary_emb.inv_freq") {
                continue  // drop-position-ids, drop-rotary-inv-freq
            }
            if tied && key.hasPrefix("language_model.lm_head.") {
                continue  // drop-tied-lm-head
            }
            if key.hasSuffix("patch_embedding.weight") && !isMLXConvLayout(value) {
                out[key] = value.transposed(0, 2, 3, 1)  // conv-layout
            } else {
                out[key] = value
            }
        }
        return out
    }

    /// `quantize(model:)` -- which `loadWeights` runs for every module that has `.scales` --
    /// applies the swaps with `update(modules:)`. MLXNN applies a list update only when its
    /// first entry is an update: it stops with `unexpectedStructure` on `mlp1`, whose entry 0
    /// (the LayerNorm) is never quantized, and with `mismatchedContainers` on a layer list in
    /// which some layer has no quantized module at all (a recipe that keeps a whole layer in
    /// float). The gaps are filled here with "no change" entries: the module itself for a list
    /// of leaf modules, an empty update for a list of layers.
    @discardableResult
    public override func update(
        modules: ModuleChildren, verify: VerifyUpdate, path: [String] = [],
        modulePath: [String] = []
    ) throws -> Self {
        var filled = modules
        for key in Array(modules.keys) {
            filled[key] = modules[key].map(Self.fillingListGaps)
        }
        if case .array(var items)? = filled["mlp1"] {
            for (index, layer) in mlp1.enumerated() {
                if index >= items.count {
                    items.append(NestedItem<String, Module>.value(layer as Module))
                } else if case .none = items[index] {
                    items[index] = NestedItem<String, Module>.value(layer as Module)
                }
            }
            filled["mlp1"] = NestedItem<String, Module>.array(items)
        }
        return try super.update(
            modules: filled, verify: verify, path: path, modulePath: modulePath)
    }

    static func fillingListGaps(_ item: NestedItem<String, Module>) -> NestedItem<String, Module> {
        switch item {
        case .array(let items):
            let entries = items.map(fillingListGaps)
            var holdsLayers = false
            for entry in entries {
                if case .dictionary = entry {
                    holdsLayers = true
                }
            }
            guard holdsLayers else {
                return .array(entries)
            }
            return .array(
                entries.map { (entry) -> NestedItem<String, Module> in
                    if case .none = entry {
                        return NestedItem<String, Module>.dictionary([:])
                    }
                    return entry
                })
        case .dictionary(let values):
            return .dictionary(values.mapValues(fillingListGaps))
        default:
            return item
        }
    }
}

/// mlx-vlm's `check_array_shape`: a 4-D conv weight already in MLX layout [O, kH, kW, I].
private func isMLXConvLayout(_ w: MLXArray) -> Bool {
    guard w.ndim == 4 else { return false }
    let (o, kh, kw) = (w.dim(0), w.dim(1), w.dim(2))
    return o >= kh && o >= kw && kh == kw
}
