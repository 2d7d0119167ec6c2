// Registers InternVL with MLXVLM's shared registries, so that VLMModelFactory loads a
// speedq-mlx artifact (config.json `model_type: internvl_chat`, preprocessor_config.json
// `processor_class: InternVLChatProcessor`) like any built-in model.

import Foundation
import MLXLMCommon
import MLXVLM

public enum SpeedQVLM {

    /// The `model_type` this package adds to MLXVLM.
    public static let modelType = "internvl_chat"

    /// The `processor_class` this package adds to MLXVLM.
    public static let processorClass = "InternVLChatProcessor"

    /// Call once, before loading (e.g. at app launch). Registering again replaces the same
    /// creators with themselves.
    ///
    /// ```swift
    /// await SpeedQVLM.register()
    /// let container = try await VLMModelFactory.shared.loadContainer(
    ///     from: artifactFolder, using: #huggingFaceTokenizerLoader())
    /// ```
    public static func register() async {
        await VLMTypeRegistry.shared.registerModelType(
            modelType,
            creator: { data in
                let configuration = try JSONDecoder().decode(
                    InternVLChatConfiguration.self, from: data)
                return InternVLChat(configuration)
            }
        )
        await VLMProcessorTypeRegistry.shared.registerProcessorType(
            processorClass,
            creator: { data, tokenizer in
                let configuration = try JSONDecoder().decode(
                    InternVLChatProcessorConfiguration.self, from: data)
                return InternVLChatProcessor(configuration, tokenizer: tokenizer)
            }
        )
    }
}
