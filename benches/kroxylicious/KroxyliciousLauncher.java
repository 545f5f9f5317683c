// Starts Kroxylicious (kroxylicious-runtime from Maven Central; its CLI module is not published there)
// from a YAML config, for scripts/bench's side-by-side run. Pass-through: no filters configured.
//
//   java -cp "<kroxylicious libs>/*:<classes>" KroxyliciousLauncher CONFIG.yaml
import io.kroxylicious.proxy.KafkaProxy;
import io.kroxylicious.proxy.config.ConfigParser;
import io.kroxylicious.proxy.config.Configuration;
import io.kroxylicious.proxy.internal.config.Features;
import java.nio.file.Files;
import java.nio.file.Path;

public class KroxyliciousLauncher {
    public static void main(String[] args) throws Exception {
        if (args.length != 1) throw new IllegalArgumentException("usage: KroxyliciousLauncher CONFIG.yaml");
        ConfigParser parser = new ConfigParser();
        Configuration config = parser.parseConfiguration(Files.readString(Path.of(args[0])));
        try (KafkaProxy proxy = new KafkaProxy(parser, config, Features.defaultFeatures())) {
            proxy.startup();
            System.out.println("kroxylicious started");
            proxy.block();
        }
    }
}
