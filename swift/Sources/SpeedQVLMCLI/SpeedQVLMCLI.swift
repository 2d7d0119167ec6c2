// speedq-vlm: answer a question about an image with a speedq-mlx artifact, streaming tokens.
//
//   speedq-vlm ARTIFACT_FOLDER IMAGE "What is in the picture?" [--max-tokens N]
//
// (build it with xcodebuild, see README.md: SwiftPM alone cannot build MLX's Metal shaders)
//
// ARTIFACT_FOLDER is what `speedq-mlx quantize` writes (config.json, model.safetensors,
// tokenizer files, preprocessor_config.json).

import CoreImage
import Foundation
import MLXHuggingFace
import MLXLMCommon
import MLXVLM
import SpeedQVLM
import Tokenizers

@main
struct SpeedQVLMCLI {
    static func main() async {
        var arguments = Array(CommandLine.arguments.dropFirst())
        var maxTokens = 256
        if let flag = arguments.firstIndex(of: "--max-tokens"), flag + 1 < arguments.count,
            let value = Int(arguments[flag + 1])
        {
            maxTokens = value
            arguments.removeSubrange(flag ... flag + 1)
        }
        guard arguments.count >= 3 else {
            FileHandle.standardError.write(
                Data("usage: speedq-vlm ARTIFACT_FOLDER IMAGE QUESTION... [--max-tokens N]\n".utf8))
            exit(2)
        }
        let folder = URL(fileURLWithPath: arguments[0], isDirectory: true)
        let image = URL(fileURLWithPath: arguments[1])
        let question = arguments[2...].joined(separator: " ")

        do {
            try await answer(
                folder: folder, image: image, question: question, maxTokens: maxTokens)
        } catch {
            FileHandle.standardError.write(Data("error: \(error.localizedDescription)\n".utf8))
            exit(1)
        }
    }

    static func answer(folder: URL, image: URL, question: String, maxTokens: Int) async throws {
        await SpeedQVLM.register()
        let container = try await VLMModelFactory.shared.loadContainer(
            from: folder, using: #huggingFaceTokenizerLoader())

        let input = try await container.prepare(
            input: UserInput(chat: [.user(question, images: [.url(image)])]))
        let stream = try await container.generate(
            input: input, parameters: GenerateParameters(maxTokens: maxTokens, temperature: 0))
        for await event in stream {
            switch event {
            case .chunk(let text):
                print(text, terminator: "")
                fflush(stdout)
            case .info(let info):
                print("\n\n\(info.summary())")
            default:
                break
            }
        }
    }
}
