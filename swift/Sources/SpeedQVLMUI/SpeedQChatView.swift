// A minimal SwiftUI chat about one picture (iOS 17+ and macOS 14+): pick an image, ask a
// question, watch the answer stream in. The model is a speedq-mlx artifact folder, bundled
// with the app or downloaded on first launch (see swift/README.md).

import CoreImage
import MLXHuggingFace
import MLXLMCommon
import MLXVLM
import PhotosUI
import SpeedQVLM
import SwiftUI
import Tokenizers

/// Loads the artifact once and streams answers.
@MainActor
@Observable
public final class SpeedQChatModel {
    public enum Source: Sendable {
        /// an artifact folder on disk (in the app bundle, or already downloaded)
        case folder(URL)
        /// a folder produced on first use, e.g. by downloading the artifact (see README)
        case lazy(@Sendable () async throws -> URL)
    }

    public private(set) var status = "Model not loaded"
    public private(set) var answer = ""
    public private(set) var isBusy = false

    private let source: Source
    private let parameters: GenerateParameters
    private var container: ModelContainer?

    public init(source: Source, maxTokens: Int = 256) {
        self.source = source
        self.parameters = GenerateParameters(maxTokens: maxTokens, temperature: 0)
    }

    func loadedContainer() async throws -> ModelContainer {
        if let container {
            return container
        }
        status = "Loading model..."
        await SpeedQVLM.register()
        let folder: URL
        switch source {
        case .folder(let url): folder = url
        case .lazy(let produce): folder = try await produce()
        }
        let container = try await VLMModelFactory.shared.loadContainer(
            from: folder, using: #huggingFaceTokenizerLoader())
        self.container = container
        status = "Model loaded"
        return container
    }

    /// Ask about `image` (or text only when nil); the answer streams into `answer`.
    public func ask(_ question: String, image: CIImage?) async {
        guard !isBusy else { return }
        isBusy = true
        defer { isBusy = false }
        answer = ""
        do {
            let container = try await loadedContainer()
            let images: [UserInput.Image] = image.map { [.ciImage($0)] } ?? []
            let input = try await container.prepare(
                input: UserInput(chat: [.user(question, images: images)]))
            status = "Answering..."
            for await event in try await container.generate(input: input, parameters: parameters) {
                switch event {
                case .chunk(let text):
                    answer += text
                case .info(let info):
                    status = String(format: "%.1f tokens/s", info.tokensPerSecond)
                default:
                    break
                }
            }
        } catch {
            status = "Error: \(error.localizedDescription)"
        }
    }
}

public struct SpeedQChatView: View {
    @State private var model: SpeedQChatModel
    @State private var question = "Describe the image."
    @State private var pickedItem: PhotosPickerItem?
    @State private var image: CIImage?

    public init(model: SpeedQChatModel) {
        _model = State(initialValue: model)
    }

    public var body: some View {
        VStack(alignment: .leading, spacing: 12) {
            PhotosPicker(selection: $pickedItem, matching: .images) {
                Label(image == nil ? "Choose a picture" : "Change picture", systemImage: "photo")
            }
            .onChange(of: pickedItem) { _, item in
                Task {
                    if let data = try? await item?.loadTransferable(type: Data.self) {
                        image = CIImage(data: data)
                    }
                }
            }
            if let image, let cgImage = CIContext().createCGImage(image, from: image.extent) {
                Image(decorative: cgImage, scale: 1)
                    .resizable()
                    .scaledToFit()
                    .frame(maxHeight: 240)
            }
            HStack {
                TextField("Question", text: $question)
                    .textFieldStyle(.roundedBorder)
                    .onSubmit(send)
                Button("Ask", action: send)
                    .disabled(model.isBusy || question.isEmpty)
            }
            ScrollView {
                Text(model.answer)
                    .textSelection(.enabled)
                    .frame(maxWidth: .infinity, alignment: .leading)
            }
            Text(model.status)
                .font(.footnote)
                .foregroundStyle(.secondary)
        }
        .padding()
    }

    private func send() {
        let question = question
        let image = image
        Task { await model.ask(question, image: image) }
    }
}
