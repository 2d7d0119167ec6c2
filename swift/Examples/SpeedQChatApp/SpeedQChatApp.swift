// The app entry of the example: add this file to an Xcode "App" target (iOS or macOS) that
// links the SpeedQVLMUI library, and bundle an artifact folder as a folder reference named
// "speedq-artifact" (or change `artifactName`). See swift/README.md.

import SpeedQVLMUI
import SwiftUI

@main
struct SpeedQChatApp: App {
    static let artifactName = "speedq-artifact"

    var body: some Scene {
        WindowGroup {
            if let folder = Bundle.main.url(forResource: Self.artifactName, withExtension: nil) {
                SpeedQChatView(model: SpeedQChatModel(source: .folder(folder)))
            } else {
                Text("Add the artifact folder \"\(Self.artifactName)\" to the app bundle.")
                    .padding()
            }
        }
    }
}
