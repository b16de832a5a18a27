// Command apiextensions-apiserver is k8s.io/apiextensions-apiserver's server with one change: it sets
// the OpenAPI v2 config, as kube-apiserver does, so that the CRD OpenAPI controllers run and custom
// resources appear under /openapi/v2 and /openapi/v3 (what `kubectl explain` reads).
//
// The stock main (k8s.io/apiextensions-apiserver/main.go) sets only OpenAPIV3Config; the apiextensions
// server starts its CRD OpenAPI controllers only when the generic server has a static v2 spec, so with
// the stock main no CRD is ever published in the OpenAPI documents. Built by
// tests/cluster/build-apiextensions.sh in GOPATH mode against Debian's golang-k8s-*-dev sources.
package main

import (
	"os"

	"github.com/spf13/cobra"

	"k8s.io/apiextensions-apiserver/pkg/apiserver"
	"k8s.io/apiextensions-apiserver/pkg/cmd/server/options"
	generatedopenapi "k8s.io/apiextensions-apiserver/pkg/generated/openapi"
	openapinamer "k8s.io/apiserver/pkg/endpoints/openapi"
	genericapiserver "k8s.io/apiserver/pkg/server"
	"k8s.io/apiserver/pkg/util/openapi"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/component-base/cli"
	"k8s.io/component-base/version/verflag"
)

func main() {
	o := options.NewCustomResourceDefinitionsServerOptions(os.Stdout, os.Stderr)
	cmd := &cobra.Command{
		Use:   "apiextensions-apiserver",
		Short: "Kubernetes CRD API server with CRDs published in OpenAPI v2/v3 (kubetune test tier)",
		PersistentPreRunE: func(*cobra.Command, []string) error {
			return o.ServerRunOptions.ComponentGlobalsRegistry.Set()
		},
		RunE: func(c *cobra.Command, _ []string) error {
			verflag.PrintAndExitIfRequested() // --version, as kube-apiserver has
			if err := o.Complete(); err != nil {
				return err
			}
			if err := o.Validate(); err != nil {
				return err
			}
			config, err := o.Config()
			if err != nil {
				return err
			}
			// The one difference from the stock command: a v2 OpenAPI config, built from the same
			// definitions and namer the stock options use for v3.
			config.GenericConfig.OpenAPIConfig = genericapiserver.DefaultOpenAPIConfig(
				openapi.GetOpenAPIDefinitionsWithoutDisabledFeatures(generatedopenapi.GetOpenAPIDefinitions),
				openapinamer.NewDefinitionNamer(apiserver.Scheme, scheme.Scheme),
			)
			server, err := config.Complete().New(genericapiserver.NewEmptyDelegate())
			if err != nil {
				return err
			}
			return server.GenericAPIServer.PrepareRun().RunWithContext(c.Context())
		},
	}
	cmd.SetContext(genericapiserver.SetupSignalContext())
	o.AddFlags(cmd.Flags())
	verflag.AddFlags(cmd.Flags())
	os.Exit(cli.Run(cmd))
}
